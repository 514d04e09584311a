"""The kernel set a low-precision linear layer runs on: Triton kernels, or their torch references.

Both sets have the same signatures, so the recipes in linear.py are written once. `reference_ops()`
runs anywhere (CPU: dequantize + fp32 matmul); `triton_ops()` needs CUDA or TRITON_INTERPRET=1.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from . import reference as ref
from ._triton import HAS_TRITON


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOps:
    """One implementation of every primitive the recipes need."""

    name: str
    act_quant: Callable  # (x [M, K], pow2) -> (fp8 codes, scales [M, ceil(K/128)])
    weight_quant: Callable  # (w [N, K], pow2) -> (fp8 codes, scales [ceil(N/128), ceil(K/128)])
    fp8_gemm: Callable  # (a, a_scales, b, b_scales, b_group, out_dtype, fast_accum) -> fp [M, N]
    hadamard: Callable  # (x, block, signs) -> fp32
    fp4_quant: Callable  # (x, fmt, rule, noise, tensor_scale, block_rows[, seed]) -> (fp32, mask)
    # Stochastic-rounding noise from torch.rand (reproducible under torch.manual_seed) instead of
    # the kernel's own tl.rand; the tests set it to compare Triton and reference paths exactly.
    torch_noise: bool = True

    def fp4(self, x, fmt, rule, tensor_scale=None, block_rows=1):
        """FP4 quantize-dequantize with noise drawn per this ops' policy."""
        if rule == "sr" and self.torch_noise:
            noise = torch.rand(x.shape, device=x.device)
            return self.fp4_quant(x, fmt, rule, noise, tensor_scale, block_rows)
        return self.fp4_quant(x, fmt, rule, None, tensor_scale, block_rows)


def _fp8_gemm_ref(a, a_scales, b, b_scales, b_group, out_dtype=torch.float32, fast_accum=False):
    # fast_accum only changes the tensor-core accumulation of the kernel; fp32 here.
    return ref.fp8_gemm_ref(a, a_scales, b, b_scales, b_group).to(out_dtype)


@functools.lru_cache(maxsize=None)
def reference_ops() -> KernelOps:
    return KernelOps(
        name="reference",
        act_quant=ref.act_quant_ref,
        weight_quant=ref.weight_quant_ref,
        fp8_gemm=_fp8_gemm_ref,
        hadamard=ref.hadamard_ref,
        fp4_quant=ref.fp4_quant_ref,
    )


@functools.lru_cache(maxsize=None)
def triton_ops(torch_noise: bool = False) -> KernelOps:
    """The Triton kernels (imported here, lazily: importing them decorates the kernels)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need triton: pip install 'fuyou[kernels]', or use backend='reference'")
    from .act_quant import act_quant
    from .fp4_quant import fp4_quant
    from .fp8_gemm import fp8_gemm
    from .hadamard import hadamard
    from .weight_quant import weight_quant

    return KernelOps(
        name="triton",
        act_quant=act_quant,
        weight_quant=weight_quant,
        fp8_gemm=fp8_gemm,
        hadamard=hadamard,
        fp4_quant=fp4_quant,
        torch_noise=torch_noise,
    )


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, a_scale=None, b_scale=None) -> torch.Tensor:
    """a @ b for FP4-dequantized operands (fp32 values), fp32 result.

    On CUDA the product runs in BF16: an E2M1 value times an E4M3 or power-of-two block scale is
    exact in bf16, once the fp32 tensor scale (a_scale/b_scale, NVFP4) is divided out and
    multiplied back after. On CPU, fp32: on the AVX2-only 2-vCPU EPYC dev box bf16 matmul is ~100x
    slower (~1.3 GFLOP/s against 40-120 GFLOP/s in fp32). CPUs with AVX512-BF16 run bf16 matmul
    faster than fp32 (about 2x on a 2-vCPU EPYC that has it).
    """
    if not a.is_cuda:
        return a @ b
    a16 = (a / a_scale if a_scale is not None else a).bfloat16()
    b16 = (b / b_scale if b_scale is not None else b).bfloat16()
    out = (a16 @ b16).float()
    if a_scale is not None:
        out = out * a_scale
    if b_scale is not None:
        out = out * b_scale
    return out
