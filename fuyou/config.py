"""Configuration: one frozen, keyword-only dataclass per component, validated at construction."""
from __future__ import annotations

import re
from dataclasses import dataclass
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
