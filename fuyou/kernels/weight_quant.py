"""128x128-tile FP8 quantizer for weights [N, K] (one fp32 scale per tile)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import AMAX_EPS_C, FP8_MAX_C, pow2_ceil
from ._triton import check_2d, check_device, pick_configs
from .reference import FP8_DTYPE, FP8_GROUP

# One 128x128 tile per program (the scale's tile), so only the warp count is free. On CUDA the
# autotuner picks one of these two per K at the first launch; the candidates were chosen from the
# tile's register footprint, not from a sweep on a GPU.
_CONFIGS = [triton.Config({}, num_warps=8), triton.Config({}, num_warps=4)]


@triton.autotune(configs=pick_configs(_CONFIGS), key=["K"])
@triton.jit
def _weight_quant_kernel(
    w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_wk, POW2: tl.constexpr, TILE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * TILE + tl.arange(0, TILE)
    offs_k = pid_k * TILE + tl.arange(0, TILE)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    w = w.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), AMAX_EPS_C)
    scale = tl.math.div_rn(amax, FP8_MAX_C)
    if POW2:
        scale = pow2_ceil(scale)
    q = tl.clamp(tl.math.div_rn(w, scale), -FP8_MAX_C, FP8_MAX_C)
    tl.store(q_ptr + offs_n[:, None] * K + offs_k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, TILE) + pid_k, scale)


def weight_quant(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of reference.weight_quant_ref: (codes fp8 [N, K], scales fp32 [ceil(N/128), ceil(K/128)])."""
    check_2d("w", w)
    check_device(w)
    n, k = w.shape
    codes = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    scales = torch.empty((triton.cdiv(n, FP8_GROUP), triton.cdiv(k, FP8_GROUP)), dtype=torch.float32, device=w.device)
    if w.numel() == 0:
        return codes, scales
    grid = (triton.cdiv(n, FP8_GROUP), triton.cdiv(k, FP8_GROUP))
    _weight_quant_kernel[grid](w, codes, scales, n, k, w.stride(0), w.stride(1), POW2=pow2, TILE=FP8_GROUP)
    return codes, scales
