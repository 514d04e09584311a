"""Triton availability, interpreter detection and the shared input checks of the kernel launchers.

Triton is optional: fuyou.kernels imports without it and then only the torch reference paths run.
Kernel modules import triton at their top, so they are imported lazily (fuyou.kernels.ops).
"""
from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1).

    The variable must be set before the kernels are decorated, i.e. before fuyou.kernels' kernel
    modules are imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or interpreting()


def pick_configs(configs: list) -> list:
    """The autotune table, cut to its first entry under the interpreter.

    Benchmarking several configs needs triton.testing.do_bench, which fails without a GPU, and
    under the interpreter every config computes the same result anyway.
    """
    return configs[:1] if interpreting() else configs


def check_device(*tensors: torch.Tensor) -> None:
    """Raise unless every tensor lives where the Triton kernels can run (CUDA, or CPU interpreted)."""
    for t in tensors:
        if not triton_usable(t.device):
            raise RuntimeError(
                f"Triton kernel got a tensor on {t.device}; run on CUDA, set TRITON_INTERPRET=1 "
                "before importing fuyou.kernels, or use the *_ref functions in fuyou.kernels.reference"
            )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"Triton kernel inputs on several devices {sorted(map(str, devices))}; move them to one")


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}; reshape to [rows, cols] first")
