"""Binding of the fused C++ AdamW (fuyou._adam): checks the parts, hands their addresses over.

The caller names the codecs (a ParamCodecs from the registry); each gives the kernel its id and
its parts in the kernel's order. The kernel reproduces the codecs' references (codec_ref.py) and
adamw.py: bit-exact for fp32 / bf16 moments and fp32 /
bf16+rem master; for fp8 and de8 it decodes exactly as the references do and encodes fp8 with a
fast log2/exp2 (a code may differ by one step from the reference at a rounding boundary).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .codec_ref import de8_bucket_table, de8_padded_mids, dynamic_map, fp8_root_table
from .codecs import Codec, ParamCodecs

try:  # the extension is optional: without it fuyou runs the torch reference path
    from fuyou import _adam as _ext

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised when the build failed
    _ext = None
    _IMPORT_ERROR = str(exc)

Parts = Dict[str, torch.Tensor]

_TABLES: Optional[tuple] = None


def available() -> bool:
    return _ext is not None


def import_error() -> Optional[str]:
    return _IMPORT_ERROR


def has_avx2() -> bool:
    return bool(_ext is not None and _ext.has_avx2())


def _tables() -> tuple:
    """Addresses of the shared lookup tables (kept alive in module globals)."""
    global _TABLES
    if _TABLES is None:
        root = fp8_root_table()
        smap, umap = dynamic_map(True)[0], dynamic_map(False)[0]
        keep = (root, smap, de8_padded_mids(True), umap, de8_padded_mids(False),
                de8_bucket_table(True), de8_bucket_table(False))
        _TABLES = (keep, tuple(t.data_ptr() for t in keep))
    return _TABLES[1]


def _addr(t: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> int:
    if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(
            f"{what}: expected a contiguous CPU {dtype} tensor of {numel} elements, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}; build the parts with state_layout()"
        )
    return t.data_ptr()


def _codec_arg(codec: Codec, parts: Parts, numel: int, what: str, slots: int) -> tuple:
    """(kernel id, the addresses of the codec's parts in layout order, 0 for the `slots` it leaves unused)."""
    if codec.kernel_id is None:
        raise ValueError(f"{what}: the fused kernel cannot write codec {codec.name!r}")
    addrs = []
    for spec in codec.layout(numel):
        if spec.name not in parts:
            raise ValueError(f"{what}: no part {spec.name!r} for codec {codec.name!r} (got {sorted(parts)}); build the parts with state_layout()")
        addrs.append(_addr(parts[spec.name], spec.dtype, spec.numel, f"{what}.{spec.name}"))
    return (codec.kernel_id, *addrs, *(0,) * (slots - len(addrs)))


def hyper_values(*, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 grad_scale: float) -> tuple:
    """The per-step scalars, computed in double exactly as torch.optim.AdamW does."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return (1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(bias_correction2), eps,
            -(lr / bias_correction1), grad_scale)


PHASE_FULL, PHASE_MOMENTS, PHASE_APPLY = 0, 1, 2
# Elements per round of the torch-sqrt update: its fp32 state (grad, master, m, v, root: 20 B per
# element) stays in this machine's L3 between the three passes of a round, so DRAM sees one pass.
TORCH_SQRT_CHUNK = 1 << 18


def _kernel_args(codecs: ParamCodecs, grad: torch.Tensor, parts: Dict[str, Parts], hyper: tuple) -> tuple:
    """The kernel's positional arguments (after checking every part); `grad` is flat fp32."""
    if _ext is None:
        raise RuntimeError(f"fuyou._adam is not built ({_IMPORT_ERROR}); run `python setup.py build_ext --inplace`")
    numel = grad.numel()
    return (
        numel,
        _addr(grad, torch.float32, numel, "grad"),
        _codec_arg(codecs.master, parts["master"], numel, "master", 2),
        _codec_arg(codecs.moments, parts["exp_avg"], numel, "exp_avg", 3),
        _codec_arg(codecs.moments, parts["exp_avg_sq"], numel, "exp_avg_sq", 3),
        _codec_arg(codecs.weights, parts["weights"], numel, "weights", 1),
        hyper,
        _tables(),
    )


def _flat_fp32(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.reshape(-1)
    return grad if grad.dtype == torch.float32 and grad.is_contiguous() else grad.float().contiguous()


@torch.no_grad()
def adamw_fused_(codecs: ParamCodecs, grad: torch.Tensor, parts: Dict[str, Parts], *, step: int, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: float = 1.0,
                 threads: Optional[int] = None, simd: bool = True) -> None:
    """One fused AdamW step over the parts, stored in `codecs`."""
    grad = _flat_fp32(grad)
    hyper = hyper_values(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         grad_scale=grad_scale)
    args = _kernel_args(codecs, grad, parts, hyper)
    _ext.adamw(*args, threads=int(threads or torch.get_num_threads()), simd=simd)


@torch.no_grad()
def adamw_torch_sqrt_(codecs: ParamCodecs, grad: torch.Tensor, parts: Dict[str, Parts], *, step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: float = 1.0,
                      threads: Optional[int] = None, chunk: Optional[int] = None) -> None:
    """fp32 AdamW bit-identical to torch.optim.AdamW (single tensor) on this CPU, at the fused kernel's
    speed: per round of `chunk` elements, the kernel updates m, v and decays the master in place,
    torch.sqrt (torch's own, MKL VML on x86, not correctly rounded) takes the root of v, and the
    kernel applies the step and emits fp32/bf16 weights. fp32 master and moments only."""
    grad = _flat_fp32(grad)
    hyper = hyper_values(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         grad_scale=grad_scale)
    numel, g_addr, master, m, v, (w_codec, w_addr), _, tables = _kernel_args(codecs, grad, parts, hyper)
    if codecs.master.name != "fp32" or codecs.moments.name != "fp32":
        raise ValueError("adamw_torch_sqrt_ needs fp32 master and moments (fuyou's fp32 mode)")
    threads = int(threads or torch.get_num_threads())
    chunk = chunk or TORCH_SQRT_CHUNK
    v_flat = codecs.moments.values(parts["exp_avg_sq"], numel).reshape(-1)
    root = torch.empty(min(numel, chunk), dtype=torch.float32)
    w_size = codecs.weights.layout(numel)[0].dtype.itemsize  # the kernel writes plain weights: one array
    for off in range(0, numel, chunk):
        n = min(chunk, numel - off)
        # This round's arrays: every address moved on by `off` elements.
        g_at, p_at, m_at, v_at = (addr + 4 * off for addr in (g_addr, master[1], m[1], v[1]))
        round_args = (n, g_at, (master[0], p_at, 0), (m[0], m_at, 0, 0), (v[0], v_at, 0, 0), (w_codec, w_addr + w_size * off),
                      hyper, tables)
        _ext.adamw(*round_args, threads=threads, phase=PHASE_MOMENTS)
        torch.sqrt(v_flat[off : off + n], out=root[:n])
        _ext.adamw(*round_args, threads=threads, phase=PHASE_APPLY, root=root.data_ptr())
