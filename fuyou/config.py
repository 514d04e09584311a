"""Every run setting of fuyou: one frozen, keyword-only dataclass per component, validated at
construction. This module imports nothing of fuyou: every other module may import it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text) -> int:
    """'4GiB', '512MiB', '1.5G', '4096' -> bytes (binary units; KB/MB/GB are read as KiB/MiB/GiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}; write it like 4GiB, 512MiB or 1073741824")
    unit = (m.group(2) or "").upper()[:1]
    if unit == "B":
        unit = ""
    return int(float(m.group(1)) * _UNITS[unit])


WEIGHT_CODECS = ("fp32", "bf16", "fp8")  # compute weights streamed to the device
MASTER_CODECS = ("fp32", "bf16+rem")  # master weights the optimizer updates
MOMENT_CODECS = ("fp32", "bf16", "fp8", "de8")  # AdamW exp_avg / exp_avg_sq
DEFAULT_MODEL = "llama-tiny"  # a preset of fuyou.model.source
MAX_PREFETCH_DEPTH = 4  # deeper staging only absorbs jitter the cost model does not see


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW hyper-parameters (torch.optim.AdamW semantics)."""

    lr: float = 1e-4  # learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled weight decay
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps, then constant

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}; pass e.g. --lr 1e-5")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"AdamW betas must lie in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight decay and warm-up steps must be >= 0")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (counting from 1)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """Budgets of the buffers fuyou owns, and the streaming depth."""

    gpu_mem_bytes: Optional[int] = None  # device budget; None = auto (most of the free device memory)
    cpu_mem_bytes: Optional[int] = None  # pinned host budget; None = auto (what the plan needs, up to half the RAM)
    # Host RAM that keeps blocks' live states and weights between steps (reads of cached blocks are
    # memory copies; writes still go to the store). None = auto (up to a quarter of the RAM); 0 = off.
    cache_mem_bytes: Optional[int] = None
    prefetch_depth: int = 2  # blocks whose weights are read ahead of the one computing
    recompute: str = "auto"  # always | never | auto: keep the forward's activations when they fit the device budget

    def __post_init__(self):
        if self.recompute not in ("always", "never", "auto"):
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

    batch_size: int = 8  # sequences per optimizer step
    micro_batches: int = 2  # the batch is split into this many micro-batches, passed layer-wise
    seq_len: int = 128  # tokens per sequence

    def __post_init__(self):
        if self.batch_size < 1 or self.micro_batches < 1 or self.seq_len < 2:
            raise ValueError("batch size and micro-batches must be >= 1 and seq-len >= 2")
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"batch size {self.batch_size} is not divisible by {self.micro_batches} micro-batches; pick a divisor, e.g. --micro-batches 1"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.micro_batches


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    """How each kind of training state is encoded in the store (fuyou.optim implements the codecs)."""

    weights: str = "fp32"  # compute weights streamed to the device: fp32 | bf16 | fp8 (blockwise E4M3)
    master: str = "fp32"  # master weights: fp32 | bf16+rem (exact fp32 as bf16 + 16-bit remainder)
    states: str = "fp32"  # AdamW moments exp_avg / exp_avg_sq: fp32 | bf16 | fp8 (E4M3+DRE) | de8

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
class FinetuneConfig:
    """Everything fuyou.train.finetune needs (`fuyou finetune` fills it from its flags)."""

    model: str = DEFAULT_MODEL  # HF model directory, or a preset name
    data: Optional[str] = None  # .jsonl / .txt; None = the bundled corpus
    store: str = "fuyou-store"  # store directory (created)
    steps: int = 60
    seed: int = 0
    resume: bool = False  # continue an existing store of this model
    overwrite: bool = False  # delete an existing fuyou store at --store first
    device: Optional[str] = None  # "cuda", "cpu"; None = cuda when present
    io_backend: str = "auto"
    trace_dir: Optional[str] = None
    max_grad_norm: Optional[float] = None  # clip the global gradient norm (exact, under overlap)
    verify_reads: bool = True  # check every block read against its CRC-32
    disk_mode: str = "safe"  # safe: old states kept until commit (exact clip/skip, up to 2x disk); lean: per-block journal (~1.25x)
    linear: Optional[str] = None  # low-precision recipe for decoder-layer linears (fp8-blockwise, mxfp4, nvfp4)
    state: StateConfig = field(default_factory=StateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """What the planner is asked: the model, the step's shape, the codecs and the budgets."""

    model: str = DEFAULT_MODEL  # preset name or a Hugging Face model directory (config.json suffices)
    batch: BatchConfig = field(default_factory=BatchConfig)
    state: StateConfig = field(default_factory=StateConfig)
    device: str = "cpu"  # "cuda" or "cpu": where the compute runs
    gpu_mem_bytes: Optional[int] = None  # device budget; None = unconstrained
    cpu_mem_bytes: Optional[int] = None  # host (pinned) budget; None = unconstrained
    ssd_bytes: Optional[int] = None  # store capacity; None = unconstrained
    cache_mem_bytes: Optional[int] = 0  # host RAM of the block cache; 0 = none, None = the run's default (a quarter of the RAM)
    max_prefetch_depth: int = MAX_PREFETCH_DEPTH
    search_micro_batches: bool = True  # False: keep batch.micro_batches

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device {self.device!r} unknown; pass --device cuda or --device cpu")
        for name in ("gpu_mem_bytes", "cpu_mem_bytes", "ssd_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name.replace('_bytes', '').replace('_', '-')} must be > 0")
        if self.cache_mem_bytes is not None and self.cache_mem_bytes < 0:
            raise ValueError("cache-mem must be >= 0 (0: no block cache)")
        if not 0 <= self.max_prefetch_depth <= 64:
            raise ValueError(f"max prefetch depth must be in 0..64, got {self.max_prefetch_depth}")
