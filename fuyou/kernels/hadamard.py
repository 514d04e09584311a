"""Block Hadamard transform along the last dim: each `block`-wide slice v -> (v * signs) @ H.

H is the orthonormal Sylvester matrix (16 or 32 wide here); random ±1 `signs` make it the
randomized Hadamard transform used by the FP4 recipes. The block product is a small tensor-core dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_2d, check_device, pick_configs
from .reference import hadamard_matrix

# Rows per program. Each program does a [BLOCK_R, B] x [B, B] dot; on CUDA the autotuner picks
# one of these per (C, B) at the first launch. The candidates bracket the dot's register use; they
# were not chosen from a sweep on a GPU.
_CONFIGS = [
    triton.Config({"BLOCK_R": 64}, num_warps=4),
    triton.Config({"BLOCK_R": 128}, num_warps=4),
    triton.Config({"BLOCK_R": 32}, num_warps=2),
]


@triton.autotune(configs=pick_configs(_CONFIGS), key=["C", "B"])
@triton.jit
def _hadamard_kernel(
    x_ptr, h_ptr, sign_ptr, y_ptr, R, C, stride_xr, stride_xc,
    B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = tl.arange(0, B)
    offs_c = pid_c * B + offs_b
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32) * tl.load(sign_ptr + offs_b)[None, :]
    h = tl.load(h_ptr + offs_b[:, None] * B + offs_b[None, :])
    # ieee: TF32 would cost ~3 significant digits before an FP4 quantizer that needs few; keep it exact.
    y = tl.dot(x, h, input_precision="ieee")
    tl.store(y_ptr + offs_r[:, None] * C + offs_c[None, :], y, mask=mask)


def hadamard(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of reference.hadamard_ref: fp32 [R, C] (C a multiple of `block`, block >= 16)."""
    check_2d("x", x)
    check_device(x)
    r, c = x.shape
    if block < 16 or c % block:
        raise ValueError(f"hadamard needs block >= 16 dividing the last dim, got block {block}, dim {c}; zero-pad it")
    if signs is None:
        signs = torch.ones(block, device=x.device)
    if tuple(signs.shape) != (block,):
        raise ValueError(f"signs must have shape ({block},), got {tuple(signs.shape)}")
    h = hadamard_matrix(block, x.device)
    y = torch.empty((r, c), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y
    grid = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), c // block)  # noqa: E731
    _hadamard_kernel[grid](x, h, signs.float().contiguous(), y, r, c, x.stride(0), x.stride(1), B=block)
    return y
