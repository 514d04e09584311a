"""The settings of each `fuyou` subcommand: the config sections of fuyou.config it is made of, and
the few settings only the command line has (the planner switch, probe shapes, output paths). The
parser is generated from these dataclasses (args.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import (
    DEVICE_MEMORY, EXPORT_DTYPES, INPUT, OUTPUT, PROBE, STORAGE, FinetuneConfig, device_setting, parse_size, section, setting,
)
from ..planning.settings import PlanConfig, RatesConfig


@dataclass(frozen=True, kw_only=True)
class FinetuneCommand:
    """Fine-tune a model whose training state lives in a store on disk.

    Fine-tune a Hugging Face causal LM with weights, fp32 master weights and AdamW states kept in
    --store, streamed block by block. With no arguments: the llama-tiny preset on the bundled corpus.
    """

    job: FinetuneConfig = section(FinetuneConfig)
    config_file: Optional[str] = setting(None, "TOML file of settings (YAML with pyyaml): the run's keys, then [optim] [batch] [memory] "
                                         "[state] [eval] [output] tables, as --print-config writes them; flags override it", flag="--config",
                                         group=INPUT)
    print_config: bool = setting(False, "print the run's effective settings in --config's format (to stdout) and exit", group=OUTPUT)
    plan: Optional[str] = setting(None, "let the planner choose --prefetch-depth, --micro-batches and the memory budgets (see `fuyou plan`)",
                                  choices=("auto",), group=DEVICE_MEMORY)


@dataclass(frozen=True, kw_only=True)
class PlanCommand:
    """Choose prefetch depth, micro-batches and optimizer slots; predict the step.

    Plan a run from the model's config alone (no weights needed): the fastest settings that fit the
    budgets, the predicted step time, its bottleneck and the bytes per tier.
    """

    device: Optional[str] = device_setting()
    plan: PlanConfig = section(PlanConfig)
    rates: RatesConfig = section(RatesConfig)
    explain: bool = setting(False, "also print the chosen plan's schedule of one step: per consumer, what it waits for and what the other "
                            "lanes run meanwhile", group=OUTPUT)


@dataclass(frozen=True, kw_only=True)
class ProbeCommand:
    """Measure this machine's storage, copy, compute and optimizer rates (saved for `fuyou plan`)."""

    store_dir: str = setting(".", "directory on the disk the store will live on (a temporary file is written there)", group=STORAGE)
    device: Optional[str] = device_setting()
    size: int = setting(512 << 20, "bytes written and read back by the storage probe", parse=parse_size, group=PROBE)
    model: Optional[str] = setting(None, "probe a decoder layer of this model's shape (a preset or a directory with config.json) instead of "
                                   "--hidden/--intermediate/--heads", group=PROBE, shown="the shape those give")
    hidden: int = setting(1024, "hidden size of the probed decoder layer", group=PROBE)
    intermediate: int = setting(2816, "MLP size of the probed decoder layer", group=PROBE)
    heads: int = setting(16, "attention heads of the probed layer", group=PROBE)
    tokens: int = setting(512, "tokens per probed call (sequences of 128)", group=PROBE)
    isolated: bool = setting(False, "probe each resource alone, not as in a step (storage and optimizer with a layer computing, "
                             "compute with storage busy)", group=PROBE)
    out: Optional[str] = setting(None, "where to save the rates JSON", group=OUTPUT, shown="the user config dir, see `fuyou plan`")

    def __post_init__(self):
        if self.hidden < 8 or self.tokens < 128 or self.heads < 1 or self.hidden % self.heads:
            raise ValueError("--hidden must be >= 8 and divisible by --heads, --tokens >= 128")
        if self.size < 1 or self.intermediate < 1:
            raise ValueError("--size and --intermediate must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ProfileCommand:
    """Summarize a trace of `fuyou finetune --trace DIR`: timeline PNG and table."""

    trace: str = setting(help="DIR/trace.json written by `fuyou finetune --trace DIR`", group=INPUT)
    step: Optional[int] = setting(None, "step to show", group=INPUT, shown="the median-length step after the first")
    png: Optional[str] = setting(None, "timeline image path", group=OUTPUT, shown="timeline.png beside the trace")
    rates: RatesConfig = section(RatesConfig)


@dataclass(frozen=True, kw_only=True)
class ExportCommand:
    """Write a Hugging Face checkpoint from a store's master weights."""

    store: Optional[str] = setting(None, "the store directory", group=INPUT, shown="the base of --run-dir")
    run_dir: Optional[str] = setting(None, "a LoRA run's directory: write its adapters (PEFT format), or with --merge the base with them merged",
                                     group=INPUT)
    merge: bool = setting(False, "with --run-dir: a full checkpoint of the base with the adapters merged into its weights", group=OUTPUT)
    to: str = setting(help="output directory (new or empty)", group=OUTPUT)
    dtype: str = setting("fp32", "dtype of the checkpoint's weights", choices=EXPORT_DTYPES, group=OUTPUT)

    def __post_init__(self):
        if (self.store is None) == (self.run_dir is None):
            raise ValueError("fuyou export needs --store (a fine-tuned store) or --run-dir (a LoRA run), one of them")
        if self.merge and self.run_dir is None:
            raise ValueError("--merge merges a LoRA run's adapters: pass --run-dir")
