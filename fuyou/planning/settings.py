"""What the planner is asked (`PlanConfig`: the model, the step's shape, the codecs, the budgets; with
ranks or adapters) and the machine rates given by hand (`RatesConfig`), declared as fuyou.config
declares a run's settings, so `fuyou plan` and `fuyou profile` get their flags the same way."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config import (
    DEFAULT_MODEL, DEVICE_MEMORY, DEVICES, MAX_PREFETCH_DEPTH, MODEL_DATA, OPTIMIZATION, RATES, BatchConfig, FinetuneConfig, MemoryConfig,
    PeftConfig, StateConfig, flag_of, parse_size, section, setting,
)


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """What the planner is asked: the model, the step's shape, the codecs and the budgets."""

    model: str = setting(DEFAULT_MODEL, "preset (llama-tiny ... llama-70b) or a directory with config.json (no weights needed)", group=MODEL_DATA)
    batch: BatchConfig = section(BatchConfig)
    state: StateConfig = section(StateConfig)
    peft: PeftConfig = section(PeftConfig, only=("method", "r", "target_modules"))  # the adapters' shape, for a LoRA run
    # The run's own settings that shape its step, with `fuyou finetune`'s defaults and flags.
    memory: MemoryConfig = section(MemoryConfig, only=("recompute",))
    job: FinetuneConfig = section(FinetuneConfig, only=("disk_mode", "max_grad_norm"))
    device: str = "cpu"  # "cuda" or "cpu": where the compute runs (`fuyou plan` sets it from PlanCommand.device)
    gpu_mem_bytes: Optional[int] = setting(None, "device memory budget", flag="--gpu-mem", parse=parse_size, group=DEVICE_MEMORY, shown="unconstrained")
    cpu_mem_bytes: Optional[int] = setting(None, "host (pinned) memory budget", flag="--cpu-mem", parse=parse_size, group=DEVICE_MEMORY,
                                           shown="unconstrained")
    ssd_bytes: Optional[int] = setting(None, "store capacity", flag="--ssd-mem", parse=parse_size, group=DEVICE_MEMORY, shown="unconstrained")
    # 0: no block cache; None: the run's default (a quarter of this machine's RAM).
    cache_mem_bytes: Optional[int] = setting(None, "host RAM of the block cache (cached blocks' reads skip the store); 0 turns it off",
                                             flag="--cache-mem", parse=parse_size, group=DEVICE_MEMORY,
                                             shown="as `fuyou finetune`: up to a quarter of this machine's RAM")
    max_prefetch_depth: int = setting(MAX_PREFETCH_DEPTH, "deepest prefetch the planner considers", group=DEVICE_MEMORY)
    search_micro_batches: bool = setting(True, "keep --micro-batches as given instead of trying every divisor of --batch-size",
                                         flag="--fixed-micro-batches", group=OPTIMIZATION)
    ranks: int = setting(1, "data-parallel ranks (torchrun --nproc-per-node): plan the busiest rank's share of a step", group=OPTIMIZATION)

    def __post_init__(self):
        if self.peft.method is not None and self.ranks > 1:
            raise ValueError("--peft runs on one process; plan it without --ranks")
        if self.ranks < 1 or self.batch.batch_size % self.ranks or (not self.search_micro_batches and self.batch.micro_batches % self.ranks):
            raise ValueError(f"--ranks {self.ranks}: a rank count >= 1 that divides --batch-size {self.batch.batch_size} (and --micro-batches); "
                             "pass multiples of it")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} unknown; pass --device cuda or --device cpu")
        for name in ("gpu_mem_bytes", "cpu_mem_bytes", "ssd_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name.replace('_bytes', '').replace('_', '-')} must be > 0")
        if self.cache_mem_bytes is not None and self.cache_mem_bytes < 0:
            raise ValueError("cache-mem must be >= 0 (0: no block cache)")
        if not 0 <= self.max_prefetch_depth <= 64:
            raise ValueError(f"--max-prefetch-depth must be in 0..64, got {self.max_prefetch_depth}")


@dataclass(frozen=True, kw_only=True)
class RatesConfig:
    """Machine rates given by hand; each replaces that rate of the saved probe (or of `path`)."""

    path: Optional[str] = setting(None, "JSON file of rates (a `fuyou probe` output, or an object of Rates fields)", flag="--rates", group=RATES)
    ssd_gbps: Optional[float] = setting(None, "storage GB/s, read and write (unless given apart)", flag="--ssd-bw", group=RATES)
    read_gbps: Optional[float] = setting(None, "storage read GB/s", group=RATES)
    write_gbps: Optional[float] = setting(None, "storage write GB/s", group=RATES)
    h2d_gbps: Optional[float] = setting(None, "host -> device GB/s", group=RATES)
    d2h_gbps: Optional[float] = setting(None, "device -> host GB/s", group=RATES)
    compute_tflops: Optional[float] = setting(None, "model TFLOP/s of the compute device", group=RATES)
    optim_mparams: Optional[float] = setting(None, "optimizer M params/s", group=RATES)
    collective_gbps: Optional[float] = setting(None, "GB/s one rank moves through a collective (data-parallel runs)", group=RATES)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "path" and v is not None and not v > 0:
                raise ValueError(f"{flag_of(f)} must be > 0, got {v}")

    def given(self) -> dict:
        """The rates given by hand, by field name (the file excluded)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path" and getattr(self, f.name) is not None}
