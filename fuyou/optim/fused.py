"""Binding of the fused C++ AdamW (fuyou._adam): checks the parts, hands their addresses over.

The caller names the codecs (a ParamCodecs from the registry); each gives the kernel its id and
its parts in the kernel's order. The kernel reproduces the codecs' references (codec_ref.py) and
adamw.py byte for byte, in each of its builds (portable, AVX2, AVX-512: `isas()` lists those this
CPU runs). fp32 mode takes torch's own sqrt (`torch_sqrt_address`), so it equals torch.optim.AdamW.
"""
from __future__ import annotations

import ctypes
import math
import os
from typing import Dict, Optional

import torch

from .codec_ref import de8_bucket_table, dynamic_map, f32_from_bits, fp8_root_table
from .codecs import Codec, ParamCodecs

from .native import IMPORT_ERROR as _IMPORT_ERROR
from .native import ext as _ext  # optional: without it fuyou runs the torch reference path

Parts = Dict[str, torch.Tensor]

_TABLES: Optional[tuple] = None


def available() -> bool:
    return _ext is not None


def import_error() -> Optional[str]:
    return _IMPORT_ERROR


ISA_NAMES = ("portable", "avx2", "avx512")  # csrc/adam/adam.h's Isa


def isas() -> list:
    """The kernel builds this CPU runs (indices into ISA_NAMES), the best last."""
    return list(range(_ext.best_isa() + 1)) if _ext is not None else []


def _tables() -> tuple:
    """Addresses of the shared lookup tables (kept alive in module globals)."""
    global _TABLES
    if _TABLES is None:
        root = fp8_root_table()
        smap, umap = dynamic_map(True)[0], dynamic_map(False)[0]
        keep = (root, smap, umap, de8_bucket_table(True), de8_bucket_table(False))
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
# Elements per round of the two-phase torch-sqrt update: its fp32 state (grad, master, m, v, root:
# 20 B per element) stays in this machine's L3 between the three passes of a round, so DRAM sees one pass.
TORCH_SQRT_CHUNK = 1 << 18
# csrc/adam/adam.h SqrtKind: the correctly rounded sqrt; torch's (MKL's vmsSqrt) called on each chunk;
# vmsSqrt's generic x86 path recomputed in registers.
SQRT_IEEE, SQRT_VML_CALL, SQRT_VML_EX = 0, 1, 2
_VML_MODE = 0x2 | 0x140000 | 0x100  # as csrc/adam/adam.h kVmlTorchMode
_TORCH_SQRT: Dict[str, tuple] = {}


def _vml_sqrt_symbol() -> Optional[int]:
    """The address of vmsSqrt (MKL, Fortran interface) in the libtorch_cpu this process has loaded, if
    it exports it: aten's CPU sqrt of fp32 tensors calls it."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LOCAL)
        return ctypes.cast(lib.VMSSQRT_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _sqrt_probe() -> torch.Tensor:
    """fp32 values that reach every entry of the rsqrt estimate's table: every normal exponent with
    every 12-bit mantissa head (random tails), 64 K random bit patterns (negative, NaN, huge included),
    subnormals and the special values."""
    gen = torch.Generator().manual_seed(0)
    e = torch.arange(1, 255, dtype=torch.int64).repeat_interleave(4096)
    head = torch.arange(4096, dtype=torch.int64).repeat(254)
    tail = torch.randint(0, 2048, (e.numel(),), generator=gen, dtype=torch.int64)
    normal = (e << 23) | (head << 11) | tail
    patterns = torch.randint(0, 2**32, (1 << 16,), generator=gen, dtype=torch.int64)
    tiny = torch.randint(0, 1 << 23, (4096,), generator=gen, dtype=torch.int64)
    special = torch.tensor([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x3F800000, 0x7F7FFFFF, 0x7F7FF000, 0x7F7FF001, 1])
    u = torch.cat([normal, patterns, tiny, special])
    return f32_from_bits(u).contiguous()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _matches_torch(run) -> bool:
    """Whether run(x, y, offset, n) writes torch.sqrt(x) into y for the probe: whole, and cut to every
    length 1..40 at four offsets (the kernel's chunks end in tails of any length)."""
    x = _sqrt_probe()
    want, got = torch.sqrt(x), torch.empty_like(x)
    run(x, got, 0, x.numel())
    if not _same_bits(want, got):
        return False
    got.zero_()
    cuts = [(off, n) for off in range(4) for n in range(1, 41)]
    for off, n in cuts:
        run(x, got, off, n)
        if not _same_bits(want[off:off + n], got[off:off + n]):
            return False
    return True


def _vml_call(addr: int):
    fn = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64))(addr)
    mode = ctypes.c_int64(_VML_MODE)
    return lambda x, y, off, n: fn(ctypes.byref(ctypes.c_int(n)), x.data_ptr() + 4 * off, y.data_ptr() + 4 * off, ctypes.byref(mode))


def torch_sqrt_kind() -> tuple:
    """(SqrtKind, vmsSqrt's address or 0) for fp32 mode: the fastest way to take torch's own sqrt
    that matched torch.sqrt bit for bit on the probe (checked once per process, for every kernel
    build): the recomputed vmsSqrt path, else vmsSqrt itself, else (None, 0): fp32 mode then runs
    the kernel in two phases around torch.sqrt."""
    if "kind" not in _TORCH_SQRT:
        addr = _vml_sqrt_symbol() if _ext is not None else None
        kind = None
        ex = lambda isa: lambda x, y, off, n: _ext.vml_ex_sqrt(x.data_ptr() + 4 * off, y.data_ptr() + 4 * off, n, isa)  # noqa: E731
        if _ext is not None and all(_matches_torch(ex(isa)) for isa in isas()):
            kind = SQRT_VML_EX
        elif addr is not None and _matches_torch(_vml_call(addr)):
            kind = SQRT_VML_CALL
        _TORCH_SQRT["kind"] = (kind, addr if kind == SQRT_VML_CALL else 0)
    return _TORCH_SQRT["kind"]


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
                 threads: Optional[int] = None, isa: Optional[int] = None, bf16_insn: bool = True) -> None:
    """One fused AdamW step over the parts, stored in `codecs` (`isa`: a build of isas(); None: the
    best; `bf16_insn=False` keeps the AVX-512 build off AVX512-BF16's conversion, for its tests)."""
    grad = _flat_fp32(grad)
    hyper = hyper_values(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         grad_scale=grad_scale)
    args = _kernel_args(codecs, grad, parts, hyper)
    _ext.adamw(*args, threads=int(threads or torch.get_num_threads()), isa=-1 if isa is None else int(isa), bf16_insn=bf16_insn)


@torch.no_grad()
def adamw_torch_sqrt_(codecs: ParamCodecs, grad: torch.Tensor, parts: Dict[str, Parts], *, step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float, grad_scale: float = 1.0,
                      threads: Optional[int] = None, chunk: Optional[int] = None, isa: Optional[int] = None,
                      one_pass: Optional[bool] = None) -> None:
    """fp32 AdamW bit-identical to torch.optim.AdamW (single tensor) on this CPU, at the fused kernel's
    speed. With torch's sqrt at hand in the kernel (torch_sqrt_kind; `one_pass` None/True) one pass:
    m, v, the root and the step per 16 elements in registers (or per chunk of 1024, calling
    vmsSqrt, in L1). Otherwise (`one_pass=False`, or neither matched torch) in rounds of `chunk` elements: the
    kernel updates m, v and decays the master in place, torch.sqrt (torch's own, MKL VML on x86, not
    correctly rounded) takes the root of v, and the kernel applies the step and emits fp32/bf16
    weights. fp32 master and moments only."""
    grad = _flat_fp32(grad)
    hyper = hyper_values(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         grad_scale=grad_scale)
    numel, g_addr, master, m, v, (w_codec, w_addr), _, tables = _kernel_args(codecs, grad, parts, hyper)
    if codecs.master.name != "fp32" or codecs.moments.name != "fp32":
        raise ValueError("adamw_torch_sqrt_ needs fp32 master and moments (fuyou's fp32 mode)")
    threads = int(threads or torch.get_num_threads())
    isa = -1 if isa is None else int(isa)
    kind, fn = torch_sqrt_kind() if one_pass is not False else (None, 0)
    if kind is not None:
        _ext.adamw(numel, g_addr, master, m, v, (w_codec, w_addr), hyper, tables, threads=threads, isa=isa, sqrt_kind=kind, torch_sqrt=fn)
        return
    if one_pass:
        raise RuntimeError("the kernel has no sqrt equal to torch.sqrt on this machine (no matching vmsSqrt in libtorch_cpu)")
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
        _ext.adamw(*round_args, threads=threads, isa=isa, phase=PHASE_MOMENTS)
        torch.sqrt(v_flat[off : off + n], out=root[:n])
        _ext.adamw(*round_args, threads=threads, isa=isa, phase=PHASE_APPLY, root=root.data_ptr())
