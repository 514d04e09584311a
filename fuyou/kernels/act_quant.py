"""1x128 FP8 quantizer for activations and output gradients (groups along the last dim).

Works on any strides, so quantizing along tokens (dim 0) is a call on the transposed view.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import AMAX_EPS_C, FP8_MAX_C, pow2_ceil
from ._triton import check_2d, check_device, pick_configs
from .reference import FP8_DTYPE, FP8_GROUP

# Rows per program: 32 rows x 128 fp32 = 16 KiB per program keeps registers modest, with 16 and 64
# on either side. On CUDA the autotuner picks one of these per K at the first launch; the
# candidates were not chosen from a sweep on a GPU (benchmarks/bench_gemm.py times the quantizers).
_CONFIGS = [
    triton.Config({"BLOCK_M": 32}, num_warps=4),
    triton.Config({"BLOCK_M": 64}, num_warps=8),
    triton.Config({"BLOCK_M": 16}, num_warps=4),
]


@triton.autotune(configs=pick_configs(_CONFIGS), key=["K"])
@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk,
    POW2: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * GROUP + tl.arange(0, GROUP)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_EPS_C)
    # div_rn: Triton's default fp32 division is approximate; the scale must match torch's.
    scale = tl.math.div_rn(amax, FP8_MAX_C)
    if POW2:
        scale = pow2_ceil(scale)
    q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs_m * tl.cdiv(K, GROUP) + pid_k, scale, mask=offs_m < M)


def act_quant(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of reference.act_quant_ref: (codes fp8 [M, K] contiguous, scales fp32 [M, ceil(K/128)])."""
    check_2d("x", x)
    check_device(x)
    m, k = x.shape
    codes = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((m, triton.cdiv(k, FP8_GROUP)), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return codes, scales
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, FP8_GROUP))  # noqa: E731
    _act_quant_kernel[grid](x, codes, scales, m, k, x.stride(0), x.stride(1), POW2=pow2, GROUP=FP8_GROUP)
    return codes, scales
