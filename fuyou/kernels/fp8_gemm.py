"""Blockwise-scaled FP8 GEMM, C = A @ B, fp32 accumulation promoted once per 128-K block.

One kernel serves the forward and both backward GEMMs of the DeepSeek-V3 recipe (see linear.py):
A [M, K] fp8 with one scale per (row, 128-K block); B [K, N] fp8 (any strides) with one scale per
(column group of B_GROUP, 128-K block): B_GROUP=128 for a 128x128 weight tile, 1 for a 128x1 group.
Each k step does `acc += dot(a, b) * sa[:, None] * sb[None, :]`: the tensor-core dot only ever sums
128 products, the rest is fp32 (DeepSeek-V3's promotion interval).

fast_accum: on sm_90 Triton lets an fp8 dot accumulate in the tensor core's reduced precision
(~14 bits, DeepSeek-V3 §3.3.2) unless told otherwise. With fast_accum the 128-product dot runs
that way (the forward); without it every MMA is promoted to fp32 (dgrad and wgrad, whose
gradients are more sensitive). Other GPUs and the interpreter ignore the setting.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_device, pick_configs
from .reference import FP8_DTYPE, FP8_GROUP

# (BLOCK_M, BLOCK_N, GROUP_M, warps, stages): Hopper block-FP8 tile shapes (vllm / DeepSeek-V3 use
# 64-128 x 128-256 x 128 tiles); autotuned per shape on the GPU (bench_gemm.py prints the winner).
# The first entry is the one used under the interpreter.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]


@triton.autotune(configs=pick_configs(_CONFIGS), key=["M", "N", "K", "B_GROUP", "IMPRECISE_ACC"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    B_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share B column-tiles while they sit in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    sa_ptrs = sa_ptr + offs_m * stride_sam
    sb_ptrs = sb_ptr + (offs_n // B_GROUP) * stride_sbn
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        # The partial last block is zero-filled: zero codes add nothing (the "pad" policy).
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        sa = tl.load(sa_ptrs + kb * stride_sak, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sbk, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, max_num_imprecise_acc=IMPRECISE_ACC) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(a, a_scales, b, b_scales, b_group):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8_gemm needs A [M, K] and B [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm takes float8_e4m3fn codes, got {a.dtype} and {b.dtype}; quantize first")
    if b_group not in (1, FP8_GROUP):
        raise ValueError(f"b_group must be 1 (128x1 groups) or 128 (128x128 tiles), got {b_group}")
    (m, k), n = a.shape, b.shape[1]
    kb = triton.cdiv(k, FP8_GROUP)
    if tuple(a_scales.shape) != (m, kb):
        raise ValueError(f"a_scales must be [{m}, {kb}] (one per row and 128-K block), got {tuple(a_scales.shape)}")
    nb = triton.cdiv(n, b_group)
    if tuple(b_scales.shape) != (nb, kb):
        raise ValueError(f"b_scales must be [{nb}, {kb}] for b_group={b_group}, got {tuple(b_scales.shape)}")
    if a_scales.dtype != torch.float32 or b_scales.dtype != torch.float32:
        raise ValueError("fp8_gemm scales must be float32")


def fp8_gemm(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, b_group: int,
    out_dtype: torch.dtype = torch.float32, fast_accum: bool = False,
) -> torch.Tensor:
    """Triton version of reference.fp8_gemm_ref: C [M, N] in `out_dtype` (fast_accum: see module doc)."""
    _check(a, a_scales, b, b_scales, b_group)
    check_device(a, a_scales, b, b_scales)
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _fp8_gemm_kernel[grid](
        a, b, c, a_scales, b_scales, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a_scales.stride(0), a_scales.stride(1), b_scales.stride(0), b_scales.stride(1),
        B_GROUP=b_group, BLOCK_K=FP8_GROUP, IMPRECISE_ACC=FP8_GROUP if fast_accum else 0,
    )
    return c
