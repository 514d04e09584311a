"""FP4 (E2M1) quantize-dequantize: MXFP4 with QuEST clipping or stochastic rounding, and NVFP4.

FP4 tensor cores exist only on Blackwell, so on Hopper the FP4 recipes emulate the numerics: this
kernel writes the dequantized values (fp32), and a BF16/FP8 GEMM follows. Rounding is to nearest
(ties toward zero) or stochastic (unbiased), the latter from tl.rand(seed) or, for tests, from a
given noise tensor. See reference.fp4_quant_ref for the exact rules.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import AMAX_EPS_C, e2m1_rtn, e2m1_sr, pow2_ceil, pow2_floor, round_e4m3
from ._triton import check_2d, check_device, pick_configs
from .reference import MX_GROUP, NV_GROUP, QUEST_GAUSSIAN_SCALE

_QUEST = tl.constexpr(QUEST_GAUSSIAN_SCALE)
# Scale rules.
_RULE_QUEST, _RULE_AMAX_POW2, _RULE_NV = 0, 1, 2

# Row-groups per program for 1-D blocks; on CUDA the autotuner picks one of the two per
# (C, GROUP, BLOCK_ROWS) at the first launch. The candidates were not chosen from a sweep on a GPU.
_CONFIGS = [triton.Config({"TILE_R": 64}, num_warps=4), triton.Config({"TILE_R": 128}, num_warps=4)]


@triton.jit
def _block_scale(x, ts, RULE: tl.constexpr, GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, UP: tl.constexpr):
    """Dequantization scale per 1xGROUP row block (shape [T, 1]) or per whole 2-D tile (scalar)."""
    if RULE == 0:
        mean = tl.math.div_rn(tl.sum(x, axis=1, keep_dims=True), GROUP * 1.0)
        mean_sq = tl.math.div_rn(tl.sum(x * x, axis=1, keep_dims=True), GROUP * 1.0)
        std = tl.sqrt_rn(tl.maximum(mean_sq - mean * mean, 0.0))
        scale = pow2_floor(std * _QUEST + 1e-8)
    else:
        if BLOCK_ROWS == 1:
            amax = tl.max(tl.abs(x), axis=1, keep_dims=True)
        else:
            amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        if RULE == 1:
            scale = pow2_ceil(tl.math.div_rn(tl.maximum(amax, AMAX_EPS_C), 6.0))
        else:
            scale = round_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 6.0), ts), UP) * ts
    return scale


@triton.autotune(configs=pick_configs(_CONFIGS), key=["C", "GROUP", "BLOCK_ROWS"])
@triton.jit
def _fp4_quant_kernel(
    x_ptr, y_ptr, mask_ptr, noise_ptr, ts_ptr, R, C, seed,
    GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, RULE: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_MASK: tl.constexpr, TILE_R: tl.constexpr,
):
    # 1-D blocks: TILE_R rows x one group; 2-D blocks: exactly one BLOCK_ROWS x GROUP tile.
    if BLOCK_ROWS == 1:
        offs_r = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)
    else:
        offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_c = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
    inside = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    offs = offs_r[:, None] * C + offs_c[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    ts = tl.load(ts_ptr)  # the NVFP4 tensor scale (a dummy address for the MX rules)
    scale = _block_scale(x, ts, RULE, GROUP, BLOCK_ROWS, STOCHASTIC)
    q = tl.where(scale > 0, tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)), 0.0)
    a = tl.minimum(tl.abs(q), 6.0)
    if STOCHASTIC:
        if HAS_NOISE:
            u = tl.load(noise_ptr + offs, mask=inside, other=0.0)
        else:
            u = tl.rand(seed, offs)
        a = e2m1_sr(a, u)
    else:
        a = e2m1_rtn(a)
    y = tl.where(q < 0, -a, a) * scale
    tl.store(y_ptr + offs, y, mask=inside)
    if HAS_MASK:
        tl.store(mask_ptr + offs, tl.abs(q) <= 6.0, mask=inside)


def fp4_quant(
    x: torch.Tensor,
    fmt: str,
    rule: str = "rtn",
    noise: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    block_rows: int = 1,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of reference.fp4_quant_ref (same arguments; `seed` drives tl.rand when
    rule == "sr" and no `noise` is given)."""
    check_2d("x", x)
    check_device(x)
    if fmt not in ("mxfp4", "nvfp4") or rule not in ("rtn", "sr"):
        raise ValueError(f"fp4_quant: fmt must be mxfp4|nvfp4 and rule rtn|sr, got {fmt!r}, {rule!r}")
    group = MX_GROUP if fmt == "mxfp4" else NV_GROUP
    r, c = x.shape
    if c % group or r % block_rows or block_rows not in (1, 16):
        raise ValueError(f"{fmt} needs [R, C] multiples of [{block_rows}, {group}] (block_rows 1 or 16), got {(r, c)}")
    if fmt == "nvfp4" and tensor_scale is None:
        raise ValueError("nvfp4 needs tensor_scale; compute it with nvfp4_tensor_scale_ref(x)")
    if fmt == "mxfp4" and block_rows != 1:
        raise ValueError("mxfp4 uses 1x32 blocks; block_rows must be 1")
    x = x.contiguous()
    rule_id = _RULE_NV if fmt == "nvfp4" else (_RULE_QUEST if rule == "rtn" else _RULE_AMAX_POW2)
    has_mask = rule_id == _RULE_QUEST
    y = torch.empty((r, c), dtype=torch.float32, device=x.device)
    mask = torch.empty((r, c), dtype=torch.bool, device=x.device) if has_mask else None
    if noise is not None:
        noise = noise.float().contiguous()
    if rule == "sr" and noise is None and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    ts = tensor_scale.float().contiguous() if tensor_scale is not None else y
    if x.numel() == 0:
        return y, mask
    if block_rows == 1:
        grid = lambda meta: (triton.cdiv(r, meta["TILE_R"]), c // group)  # noqa: E731
    else:
        grid = (r // block_rows, c // group)
    _fp4_quant_kernel[grid](
        x, y, mask if has_mask else y, noise if noise is not None else y, ts, r, c, seed or 0,
        GROUP=group, BLOCK_ROWS=block_rows, RULE=rule_id, STOCHASTIC=rule == "sr",
        HAS_NOISE=noise is not None, HAS_MASK=has_mask,
        # No fused multiply-add: QuEST's 0.487 * std + 1e-8 must round like torch's two steps,
        # or a block near a power-of-two boundary would get a different scale.
        enable_fp_fusion=False,
    )
    return y, mask
