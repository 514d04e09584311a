"""Budgeted buffer pools: pinned CPU memory and device memory.

A pool has a capacity in bytes; `alloc` hands out 4 KiB-aligned uint8 buffers and raises
`MemoryBudgetError` rather than exceed the capacity, so a run can never use more than its budget
for the buffers fuyou owns. The runtime plans its slots up front (fuyou/step/memory_plan.py) so that a
step never asks for more than fits. Each pool records its peak use.
"""
from __future__ import annotations

import threading
from typing import Dict

import torch

from .store.directio import ALIGN, aligned_empty


class MemoryBudgetError(RuntimeError):
    """An allocation would exceed a pool's budget."""


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class Pool:
    """A byte budget for buffers on one device (pinned host memory when `pin` and CUDA is present)."""

    def __init__(self, name: str, capacity_bytes: int, device: torch.device, pin: bool = False):
        self.name = name
        self.capacity_bytes = int(capacity_bytes)
        self.device = torch.device(device)
        self.pin = bool(pin) and self.device.type == "cpu" and torch.cuda.is_available()
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self._sizes: Dict[int, int] = {}  # id(buffer) -> charged bytes
        self._lock = threading.Lock()

    def _charge(self, nbytes: int, what: str = "a buffer") -> int:
        charged = (int(nbytes) + ALIGN - 1) // ALIGN * ALIGN
        if self.in_use_bytes + charged > self.capacity_bytes:
            raise MemoryBudgetError(
                f"{self.name} pool: {format_bytes(charged)} more ({what}) would exceed its budget of {format_bytes(self.capacity_bytes)} "
                f"({format_bytes(self.in_use_bytes)} in use)"
            )
        self.in_use_bytes += charged
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
        return charged

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes` (4 KiB aligned), charged to this pool."""
        with self._lock:
            charged = self._charge(nbytes)
        if self.device.type == "cpu":
            buf = aligned_empty(nbytes, pin=self.pin)
        else:
            buf = torch.empty(charged, dtype=torch.uint8, device=self.device)[: int(nbytes)]
        with self._lock:
            self._sizes[id(buf)] = charged
        return buf

    def free(self, buf: torch.Tensor) -> None:
        with self._lock:
            charged = self._sizes.pop(id(buf), None)
            if charged is None:
                raise ValueError(f"{self.name} pool: freeing a buffer this pool did not hand out")
            self.in_use_bytes -= charged

    def reserve(self, nbytes: int, what: str) -> None:
        """Charge bytes used outside fuyou's buffers (e.g. compute workspace) against the budget."""
        with self._lock:
            self._charge(nbytes, what)

    def report(self) -> dict:
        return {"pool": self.name, "capacity_bytes": self.capacity_bytes, "peak_bytes": self.peak_bytes}
