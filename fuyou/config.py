"""Every run setting of fuyou: frozen, keyword-only dataclasses, validated at construction.

One dataclass per section (optimizer, memory, batch, state codecs, ...), composed into one per
`fuyou` subcommand (FinetuneCommand, PlanCommand, ...). Each field declares in one `setting(...)` its
default, a one-line help and how the command line spells it; fuyou.cli.args generates the parser
from these declarations, so a default, a choice or a help text exists only here. This module
imports nothing of fuyou: every other module may import it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(i?)(B?)|(B))?\s*$", re.IGNORECASE)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text) -> int:
    """Bytes from '4GiB' or '512MiB' (binary), '4GB' or '500MB' (decimal: 4 GB is 4e9 bytes, as disks
    are sold), '4G' (binary, as `free -g` shows), '4096' or '4096B'."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}; write it like 4GiB, 512MiB, 4GB or 1073741824")
    number, unit, binary, suffix = float(m.group(1)), (m.group(2) or "").upper(), m.group(3), m.group(4)
    if not unit:
        return int(number)
    base = 1024 if binary or not suffix else 1000
    return int(number * base ** _POWERS[unit])


def format_size(n: int) -> str:
    """Bytes as parse_size reads them back: the largest binary unit that divides n ('512MiB')."""
    for unit in "TGMK":
        size = 1 << (10 * _POWERS[unit])
        if n and n % size == 0:
            return f"{n // size}{unit}iB"
    return str(n)


# Help groups, in the order `--help` lists them, and the note a group's title carries.
MODEL_DATA, INPUT, OPTIMIZATION, DEVICE_MEMORY = "model & data", "input", "optimization", "device & memory"
STORAGE, PRECISION, PROBE, RATES, OUTPUT = "storage", "precision", "probe", "machine rates", "output & logging"
EVAL, PEFT = "validation", "adapters (LoRA)"
GROUPS = (MODEL_DATA, INPUT, OPTIMIZATION, EVAL, PEFT, DEVICE_MEMORY, STORAGE, PRECISION, PROBE, RATES, OUTPUT)
GROUP_NOTES = {RATES: "default: the saved `fuyou probe` result, else conservative defaults"}

WEIGHT_CODECS = ("fp32", "bf16", "fp8")  # compute weights streamed to the device
MASTER_CODECS = ("fp32", "bf16+rem")  # master weights the optimizer updates
MOMENT_CODECS = ("fp32", "bf16", "fp8", "de8", "log8")  # AdamW exp_avg / exp_avg_sq
RECOMPUTE_MODES = ("auto", "always", "never")
# transformers.get_scheduler's schedules that are a function of the step (fuyou.optim.schedule).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt", "cosine_with_min_lr")
DISK_MODES = ("safe", "lean")
LINEAR_RECIPES = ("fp8-blockwise", "mxfp4", "nvfp4")
DEVICES = ("cuda", "cpu")
EXPORT_DTYPES = ("fp32", "bf16")
PEFT_METHODS = ("lora",)
DEFAULT_MODEL = "llama-tiny"  # a preset of fuyou.model.source
BUILTIN_DATA = "builtin"  # --data's name for the bundled corpus
LR_FROM_SCRATCH = 1e-3  # a preset starts from random weights: a pre-training learning rate
LR_FINETUNE = 1e-5  # a checkpoint is fine-tuned
MAX_PREFETCH_DEPTH = 4  # deeper staging only absorbs jitter the cost model does not see

CLI = "fuyou.cli"  # metadata key of a setting's command-line declaration
SECTION = "fuyou.section"  # metadata key of a nested config
ONLY = "fuyou.only"  # metadata key: the settings of a section a command offers (None: all)


@dataclass(frozen=True)
class Flag:
    """How the command line spells a setting (see `setting`)."""

    help: str
    flag: Optional[str] = None
    choices: Optional[Sequence[str]] = None
    parse: Optional[Callable] = None
    group: Optional[str] = None
    shown: Optional[str] = None


def setting(default=dataclasses.MISSING, help: str = "", *, flag=None, choices=None, parse=None, group=None, shown=None):
    """A dataclass field that is a command-line flag: `help` (one line, with units), `flag` (when it is
    not --field-name), `choices`, `parse` (text -> value, e.g. parse_size; default: the field's type),
    its help `group`, and `shown`: the default as --help states it, where the value alone says too
    little (what None means). A bool field is a switch that flips its default: its help says what
    passing the flag does, and a default-True switch names its flag (--no-verify)."""
    spec = Flag(help, flag, tuple(choices) if choices else None, parse, group, shown)
    return dataclasses.field(default=default, metadata={CLI: spec})


def section(cls, only: Optional[Sequence[str]] = None):
    """A nested config field: its settings join the command line of the config holding it (`only`:
    these of them; the others keep their defaults there)."""
    return dataclasses.field(default_factory=cls, metadata={SECTION: cls, ONLY: tuple(only) if only else None})


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a setting: its declared flag, else --field-name."""
    return field.metadata[CLI].flag or "--" + field.name.replace("_", "-")


def _exponent(x: float) -> str:
    """1e-05 -> '1e-5': a learning rate as people write it."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def device_setting():
    return setting(None, "compute device", choices=DEVICES, group=DEVICE_MEMORY, shown="cuda when present")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW hyper-parameters (torch.optim.AdamW semantics)."""

    # None: the run picks by where the weights come from (with_default_lr).
    lr: Optional[float] = setting(None, "learning rate", group=OPTIMIZATION,
                                  shown=f"{_exponent(LR_FROM_SCRATCH)} for a preset, {_exponent(LR_FINETUNE)} for a checkpoint")
    lr_scheduler: str = setting("constant", "learning-rate schedule, as transformers' get_scheduler has it (constant with a warm-up "
                                "is constant_with_warmup)", choices=LR_SCHEDULERS, group=OPTIMIZATION)
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up from 0", group=OPTIMIZATION)
    warmup_ratio: float = setting(0.0, "warm-up as a share of the run's --steps (rounded up); instead of --warmup-steps", group=OPTIMIZATION)
    min_lr_rate: float = setting(0.0, "cosine_with_min_lr: the final learning rate as a share of --lr", group=OPTIMIZATION)
    beta1: float = setting(0.9, "AdamW beta1", flag="--adam-beta1", group=OPTIMIZATION)
    beta2: float = setting(0.999, "AdamW beta2", flag="--adam-beta2", group=OPTIMIZATION)
    eps: float = setting(1e-8, "AdamW epsilon", flag="--adam-eps", group=OPTIMIZATION)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", group=OPTIMIZATION)

    def __post_init__(self):
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}; pass e.g. --lr 1e-5")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"AdamW betas must lie in [0, 1), got ({self.beta1}, {self.beta2}); pass e.g. --adam-beta2 0.95")
        if not self.eps > 0:
            raise ValueError(f"--adam-eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight decay and warm-up steps must be >= 0")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_rate <= 1:
            raise ValueError("--warmup-ratio must lie in [0, 1) and --min-lr-rate in [0, 1]")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("--warmup-steps and --warmup-ratio both set the warm-up; pass one")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler {self.lr_scheduler!r} unknown; choose one of {', '.join(LR_SCHEDULERS)}")

    def with_default_lr(self, *, from_scratch: bool) -> OptimConfig:
        """This config, its lr set if it was None: LR_FROM_SCRATCH for random weights, else LR_FINETUNE."""
        if self.lr is not None:
            return self
        return dataclasses.replace(self, lr=LR_FROM_SCRATCH if from_scratch else LR_FINETUNE)


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """Budgets of the buffers fuyou owns, and the streaming depth."""

    gpu_mem_bytes: Optional[int] = setting(None, "device memory budget, e.g. 4GiB", flag="--gpu-mem", parse=parse_size, group=DEVICE_MEMORY,
                                           shown="90% of the free device memory; on the CPU device what the plan needs")
    cpu_mem_bytes: Optional[int] = setting(None, "pinned host memory budget, e.g. 8GiB", flag="--cpu-mem", parse=parse_size, group=DEVICE_MEMORY,
                                           shown="what the plan needs, at most half the RAM")
    # Reads of cached blocks are memory copies; writes still go to the store. 0 = off.
    cache_mem_bytes: Optional[int] = setting(
        None, "host RAM that keeps whole blocks' states and weights between steps, so their reads skip the store (writes still go to it); "
        "0 turns it off", flag="--cache-mem", parse=parse_size, group=DEVICE_MEMORY, shown="up to a quarter of the RAM")
    prefetch_depth: int = setting(2, "blocks whose weights are read ahead of the one computing", group=DEVICE_MEMORY)
    recompute: str = setting(
        "auto", "backward of a decoder layer: recompute its forward from the saved input (least memory), or keep the forward's "
        "activations (no recompute, ~25% less compute); auto keeps them when they fit --gpu-mem", choices=RECOMPUTE_MODES, group=DEVICE_MEMORY)

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"--recompute {self.recompute!r} unknown; choose always, never or auto")
        for name in ("gpu_mem_bytes", "cpu_mem_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name.replace('_bytes', '').replace('_', '-')} must be > 0")
        if self.cache_mem_bytes is not None and self.cache_mem_bytes < 0:
            raise ValueError("cache-mem must be >= 0 (0 turns the block cache off)")
        if self.prefetch_depth < 0:
            raise ValueError("prefetch depth must be >= 0")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Shape of one optimizer step."""

    batch_size: int = setting(8, "sequences per optimizer step", group=OPTIMIZATION)
    micro_batches: int = setting(2, "micro-batches the batch is split into; all pass a block before the next block "
                                 "(the planner may pick another divisor)", group=OPTIMIZATION)
    seq_len: int = setting(128, "tokens per sequence", group=OPTIMIZATION)

    def __post_init__(self):
        if self.batch_size < 1 or self.micro_batches < 1 or self.seq_len < 2:
            raise ValueError("batch size and micro-batches must be >= 1 and seq-len >= 2")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {self.micro_batches} micro-batches; pick a divisor, e.g. --micro-batches 1")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.micro_batches


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    """How each kind of training state is encoded in the store (fuyou.optim implements the codecs)."""

    weights: str = setting("fp32", "compute weights kept in the store: fp32, bf16, or fp8 (E4M3, a scale per 128x128 tile; "
                           "1 B/param read per pass)", choices=WEIGHT_CODECS, group=PRECISION)
    master: str = setting("fp32", "master weights: fp32, or bf16 + 16-bit remainder (exact fp32 in 2+2 bytes)", choices=MASTER_CODECS, group=PRECISION)
    states: str = setting("fp32", "AdamW moments: fp8 = E4M3 with dynamic range expansion per 128, de8 = dynamic 8-bit per 256, "
                          "log8 = fp8's expansion on the bit pattern (8-bit log code per 128; the fastest)",
                          flag="--optim-states", choices=MOMENT_CODECS, group=PRECISION)

    def __post_init__(self):
        if self.weights not in WEIGHT_CODECS:
            raise ValueError(f"weights codec {self.weights!r} unknown; choose one of {', '.join(WEIGHT_CODECS)}")
        if self.master not in MASTER_CODECS:
            raise ValueError(f"master codec {self.master!r} unknown; choose one of {', '.join(MASTER_CODECS)}")
        if self.states not in MOMENT_CODECS:
            raise ValueError(f"optimizer-state codec {self.states!r} unknown; choose one of {', '.join(MOMENT_CODECS)}")

    def to_json(self) -> dict:
        return {"weights": self.weights, "master": self.master, "states": self.states}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Validation: a forward-only pass through the streaming runtime every few steps."""

    data: Optional[str] = setting(None, "held-out data (.jsonl or .txt) for the validation loss", flag="--eval-data", group=EVAL)
    split: float = setting(0.0, "hold out this share of --data's rows for validation instead (they are not trained on)", flag="--eval-split",
                           group=EVAL)
    every: int = setting(0, "validate every this many steps, and at the end (0: at the end only, when there is validation data)",
                         flag="--eval-every", group=EVAL)

    def __post_init__(self):
        if not 0 <= self.split < 1:
            raise ValueError(f"--eval-split must lie in [0, 1), got {self.split}")
        if self.split and self.data is not None:
            raise ValueError("--eval-data and --eval-split both name the validation data; pass one")
        if self.every < 0:
            raise ValueError("--eval-every must be >= 0")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """What a run writes besides its store: checkpoints, metrics, logs."""

    dir: Optional[str] = setting(None, "write Hugging Face checkpoints here (checkpoint-<step>/), at --save-every steps and at the end",
                                 flag="--output-dir", group=OUTPUT)
    save_every: int = setting(0, "write a checkpoint every this many steps (0: only at the end)", flag="--save-every", group=OUTPUT)
    save_total_limit: int = setting(0, "keep only the newest this many checkpoints (0: all)", flag="--save-total-limit", group=OUTPUT)
    export_dtype: str = setting("fp32", "dtype of the checkpoints' weights", flag="--export-dtype", choices=EXPORT_DTYPES, group=OUTPUT)
    log_every: int = setting(0, "without a terminal, print a line every this many steps", flag="--log-every", group=OUTPUT,
                             shown="a tenth of the run")
    tensorboard: Optional[str] = setting(None, "also write TensorBoard scalars to this directory (needs the tensorboard package)",
                                         flag="--tensorboard", group=OUTPUT)

    def __post_init__(self):
        if self.save_every < 0 or self.save_total_limit < 0 or self.log_every < 0:
            raise ValueError("--save-every, --save-total-limit and --log-every must be >= 0")
        if (self.save_every or self.save_total_limit) and self.dir is None:
            raise ValueError("--save-every and --save-total-limit need --output-dir, where the checkpoints go")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"--export-dtype {self.export_dtype!r} unknown; choose one of {', '.join(EXPORT_DTYPES)}")


@dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """Parameter-efficient fine-tuning: adapters trained on a frozen, streamed base, with peft's
    LoraConfig names and defaults."""

    method: Optional[str] = setting(None, "train LoRA adapters on the frozen base in --store instead of every weight", flag="--peft",
                                    choices=PEFT_METHODS, group=PEFT, shown="full fine-tuning")
    r: int = setting(8, "LoRA rank", flag="--lora-r", group=PEFT)
    alpha: float = setting(8.0, "LoRA alpha: the adapters' output is scaled by alpha / r", flag="--lora-alpha", group=PEFT)
    dropout: float = setting(0.0, "LoRA dropout (0: the backward's recompute needs the forward's masks)", flag="--lora-dropout", group=PEFT)
    target_modules: Optional[str] = setting(None, "comma-separated names of the linears to adapt (q_proj,v_proj), or all-linear",
                                            flag="--target-modules", group=PEFT, shown="peft's default for the model type")
    rslora: bool = setting(False, "scale the adapters by alpha / sqrt(r) (rsLoRA)", flag="--use-rslora", group=PEFT)
    init: Optional[str] = setting(None, "start from this PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
                                  flag="--lora-init", group=PEFT, shown="peft's initialisation")
    run_dir: str = setting("fuyou-lora", "the LoRA run's directory: its adapters, their optimizer state, metrics (--store holds the base)",
                           flag="--run-dir", group=PEFT)

    def __post_init__(self):
        if self.method is not None and self.method not in PEFT_METHODS:
            raise ValueError(f"--peft {self.method!r} unknown; choose one of {', '.join(PEFT_METHODS)}")
        if self.r < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ValueError("--lora-r must be >= 1, --lora-alpha > 0 and --lora-dropout in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything fuyou.train.finetune needs."""

    model: str = setting(DEFAULT_MODEL, "Hugging Face model directory (config.json + *.safetensors) or a preset "
                         "(llama-tiny, llama-220m, llama-1b, ...)", group=MODEL_DATA)
    data: Optional[str] = setting(None, f".jsonl ('text', or 'prompt'/'completion') or .txt; '{BUILTIN_DATA}' names the bundled corpus", group=MODEL_DATA,
                                  shown=f"{BUILTIN_DATA} for a preset; required with a local --model")
    data_changed_ok: bool = setting(False, "on --resume, accept a data file whose content changed since the run started (the data order "
                                    "then differs from an uninterrupted run)", group=MODEL_DATA)
    seed: int = setting(0, "seed of the data order (and of a preset's initial weights)", group=MODEL_DATA)
    steps: int = setting(60, "train until this optimizer step (a total: --resume --steps 200 continues a run to step 200)", group=OPTIMIZATION)
    max_grad_norm: Optional[float] = setting(None, "clip the global gradient norm (exact: a clipped step redoes the optimizer pass)",
                                             group=OPTIMIZATION, shown="no clipping")
    device: Optional[str] = device_setting()
    store: str = setting("fuyou-store", "store directory (created; on an NVMe SSD for real runs)", group=STORAGE)
    resume: bool = setting(False, "continue the run in --store from its last committed step, with the settings it records", group=STORAGE)
    overwrite: bool = setting(False, "replace an existing fuyou store at --store", group=STORAGE)
    disk_mode: str = setting(
        "safe", "safe: a step's old states stay until it commits (exact clipping and non-finite skipping; peak disk up to 2x the state); "
        "lean: each block's states are replaced as soon as they are written, journaled per block (peak disk ~1.25x; no clipping/skipping)",
        choices=DISK_MODES, group=STORAGE)
    io_backend: str = setting("auto", "store I/O backend: auto (the fastest available), python, threads or uring", group=STORAGE)
    verify_reads: bool = setting(True, "skip the CRC-32 check of every block read", flag="--no-verify", group=STORAGE)  # True: check it
    linear: Optional[str] = setting(None, "run the decoder layers' linear GEMMs in this low-precision recipe (Triton on CUDA, the torch "
                                    "reference on CPU)", choices=LINEAR_RECIPES, group=PRECISION, shown="the weights' dtype")
    trace_dir: Optional[str] = setting(None, "write a Chrome/Perfetto trace of every task to this directory", flag="--trace", group=OUTPUT)
    state: StateConfig = section(StateConfig)
    optim: OptimConfig = section(OptimConfig)
    batch: BatchConfig = section(BatchConfig)
    memory: MemoryConfig = section(MemoryConfig)
    eval: EvalConfig = section(EvalConfig)
    output: OutputConfig = section(OutputConfig)
    peft: PeftConfig = section(PeftConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")
        if self.disk_mode not in DISK_MODES:
            raise ValueError(f"disk mode {self.disk_mode!r} unknown; choose safe or lean")
        if self.disk_mode == "lean" and self.max_grad_norm is not None:  # checked here too: before the import writes the store
            raise ValueError("--max-grad-norm needs --disk-mode safe: lean mode replaces each block's states before the global norm is known")
        if self.linear is not None and self.linear not in LINEAR_RECIPES:
            raise ValueError(f"--linear {self.linear!r} unknown; choose one of {', '.join(LINEAR_RECIPES)}")
