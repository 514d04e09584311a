"""Plain-torch references of every fuyou kernel: fp32 math, CPU-safe, no Triton.

Each Triton kernel `<name>` in fuyou/kernels/<name>.py has `<name>_ref` here with the same
arguments; the tests compare them element-wise. The CPU execution path of the low-precision linear
layers runs these functions (dequantize, then an fp32 matmul).

Formats
- FP8 blockwise (DeepSeek-V3): codes float8_e4m3fn, one fp32 scale per group, scale = amax / 448
  (optionally rounded up to a power of two). Activations and output gradients: 1x128 groups along
  the reduction dim; weights: 128x128 tiles. A partial group/tile at the edge is zero-padded.
- MXFP4: E2M1 values in 1x32 groups with a power-of-two (E8M0) scale.
- NVFP4: E2M1 values in 1x16 groups (or 16x16 tiles for weights) with an E4M3 block scale times
  one fp32 tensor scale = amax(tensor) / (6 * 448).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
FP4_MAX = 6.0
# Non-negative E2M1 values; the sign is kept separately.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# QuEST clipping scale for a Gaussian block (Quartet): the E2M1 range [-6, 6] covers 2.92 std.
QUEST_GAUSSIAN_SCALE = 2.92247856 / 6.0
# Amax floor so that an all-zero group gets a finite scale (and zero codes), as torchao does.
AMAX_EPS = 1e-12
FP8_GROUP = 128
MX_GROUP = 32
NV_GROUP = 16


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = (-x.shape[dim]) % multiple
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return torch.nn.functional.pad(x, pad)


def div_rn(a: torch.Tensor, c: float) -> torch.Tensor:
    """a / c correctly rounded on every device, as the kernels' tl.math.div_rn computes it.

    (torch's CUDA kernels divide by a Python scalar as a multiply by its reciprocal, which is one
    ulp off for a divisor such as 448 or 6; a same-device tensor divisor gets the true division.)
    """
    return a / torch.full_like(a, c)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Exact 2**ceil(log2(s)) for positive fp32 `s` (frexp, no log rounding)."""
    mant, exp = torch.frexp(s)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(s), exp)


def pow2_floor(s: torch.Tensor) -> torch.Tensor:
    """Exact 2**floor(log2(s)) for positive fp32 `s`."""
    _, exp = torch.frexp(s)
    return torch.ldexp(torch.ones_like(s), exp - 1)


def fp8_scale_ref(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """scale = max(amax, eps) / 448, rounded up to a power of two when `pow2` (never clips)."""
    scale = div_rn(amax.float().clamp_min(AMAX_EPS), FP8_MAX)
    return pow2_ceil(scale) if pow2 else scale


def _fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Clamp before the cast: torch's float8_e4m3fn cast does not saturate.
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def act_quant_ref(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 groups along the last dim of 2-D `x`: (codes fp8 [M, K], scales fp32 [M, ceil(K/128)])."""
    m, k = x.shape
    xp = _pad_to(x.float(), 1, FP8_GROUP).view(m, -1, FP8_GROUP)
    scale = fp8_scale_ref(xp.abs().amax(dim=2), pow2)
    codes = _fp8_codes(xp, scale[:, :, None]).view(m, -1)[:, :k]
    return codes.contiguous(), scale


def weight_quant_ref(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 tiles of 2-D `w` [N, K]: (codes fp8 [N, K], scales fp32 [ceil(N/128), ceil(K/128)])."""
    n, k = w.shape
    wp = _pad_to(_pad_to(w.float(), 0, FP8_GROUP), 1, FP8_GROUP)
    nb, kb = wp.shape[0] // FP8_GROUP, wp.shape[1] // FP8_GROUP
    tiles = wp.view(nb, FP8_GROUP, kb, FP8_GROUP)
    scale = fp8_scale_ref(tiles.abs().amax(dim=(1, 3)), pow2)
    codes = _fp8_codes(tiles, scale[:, None, :, None]).view(nb * FP8_GROUP, kb * FP8_GROUP)
    return codes[:n, :k].contiguous(), scale


def act_dequant_ref(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of act_quant_ref: fp32 [M, K]."""
    k = codes.shape[1]
    return codes.float() * scales.repeat_interleave(FP8_GROUP, dim=1)[:, :k]


def weight_dequant_ref(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of weight_quant_ref: fp32 [N, K]."""
    n, k = codes.shape
    full = scales.repeat_interleave(FP8_GROUP, dim=0).repeat_interleave(FP8_GROUP, dim=1)
    return codes.float() * full[:n, :k]


def fp8_gemm_ref(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, b_group: int
) -> torch.Tensor:
    """C[M, N] = dequant(A) @ dequant(B) in fp32, the math of the blockwise FP8 GEMM kernel.

    a: fp8 [M, K] with a_scales [M, ceil(K/128)] (1x128 groups along K).
    b: fp8 [K, N] (any strides) with b_scales [ceil(N/b_group), ceil(K/128)]: b_group=128 for a
    128x128 weight tile, 1 for a 128x1 group along K per column.
    """
    k, n = b.shape
    a_deq = act_dequant_ref(a, a_scales)
    b_deq = act_dequant_ref(b.t(), b_scales.repeat_interleave(b_group, dim=0)[:n])
    return a_deq @ b_deq.t()


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix H/sqrt(n), fp32 [n, n] (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def hadamard_ref(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Block Hadamard along the last dim of 2-D `x`: each `block`-wide slice v -> (v * signs) @ H.

    With random ±1 `signs` (length `block`) this is the randomized Hadamard transform; applied to
    both GEMM operands along the reduction dim it cancels exactly (H orthonormal).
    """
    r, c = x.shape
    if c % block:
        raise ValueError(f"Hadamard block {block} does not divide the last dim {c}; zero-pad it first")
    h = hadamard_matrix(block, x.device)
    v = x.float().reshape(r, c // block, block)
    if signs is not None:
        v = v * signs.float()
    return (v @ h).reshape(r, c)


def e2m1_round_ref(a: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Round non-negative `a` (already clipped to [0, 6]) onto the E2M1 grid.

    Nearest with ties toward zero when `noise` is None; otherwise stochastic: up with probability
    (a - lo) / (hi - lo), decided by `noise` ~ U[0, 1) (up when noise < p), which is unbiased.
    """
    grid = torch.tensor(E2M1_GRID, device=a.device)
    if noise is None:
        mids = (grid[1:] + grid[:-1]) / 2
        return grid[torch.searchsorted(mids, a.contiguous(), right=False)]
    idx = torch.searchsorted(grid[1:], a.contiguous(), right=False).clamp_max(len(E2M1_GRID) - 2)
    lo, hi = grid[idx], grid[idx + 1]
    p = (a - lo) / (hi - lo)
    return torch.where(noise < p, hi, lo)


def round_e4m3_ref(v: torch.Tensor, up: bool = False) -> torch.Tensor:
    """Round non-negative fp32 `v` to the nearest E4M3 value, or up to the next one (saturating at 448)."""
    v = v.clamp(0.0, FP8_MAX)
    if not up:
        return v.to(FP8_DTYPE).float()
    _, exp = torch.frexp(v)  # v = m * 2**exp, m in [0.5, 1): the E4M3 exponent is exp - 1
    step = torch.ldexp(torch.ones_like(v), (exp - 1).clamp_min(-6) - 3)
    return (torch.ceil(v / step) * step).clamp_max(FP8_MAX)


def nvfp4_tensor_scale_ref(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 second-level scale: amax(x) / (6 * 448), shape [1]."""
    return div_rn(x.float().abs().amax().clamp_min(AMAX_EPS), FP4_MAX * FP8_MAX).reshape(1)


def _fp4_block_scale(blocks: torch.Tensor, fmt: str, rule: str, tensor_scale) -> torch.Tensor:
    """Per-block dequantization scale of `blocks` [..., B]."""
    if fmt == "nvfp4":
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        # Stochastic rounding rounds the block scale up: a clipped value would bias it.
        return round_e4m3_ref(div_rn(amax, FP4_MAX) / tensor_scale, up=rule == "sr") * tensor_scale
    if rule == "rtn":  # QuEST: Gaussian-optimal clipping, power-of-two scale
        mean = blocks.sum(-1, keepdim=True) / blocks.shape[-1]
        mean_sq = (blocks * blocks).sum(-1, keepdim=True) / blocks.shape[-1]
        std = torch.sqrt((mean_sq - mean * mean).clamp_min(0.0))
        return pow2_floor(QUEST_GAUSSIAN_SCALE * std + 1e-8)
    # Stochastic rounding must not clip (a clipped value is biased): cover the block's amax.
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_EPS)
    return pow2_ceil(div_rn(amax, FP4_MAX))


def fp4_quant_ref(
    x: torch.Tensor,
    fmt: str,
    rule: str = "rtn",
    noise: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    block_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize-dequantize 2-D `x` [R, C] to FP4 along the last dim: (fp32 values, clip mask).

    fmt "mxfp4": 1x32 groups, power-of-two scale; rule "rtn" = QuEST scale, round to nearest, clip
    to ±6 and return the mask of unclipped entries (gradients are zeroed where clipped); rule "sr"
    = amax power-of-two scale and stochastic rounding driven by `noise` (same shape as x).
    fmt "nvfp4": 1x16 groups (block_rows=16: 16x16 tiles), E4M3 block scale times `tensor_scale`
    (nvfp4_tensor_scale_ref); rule "rtn" (scale rounded to nearest E4M3, the block amax may clip
    by < 1/16) or "sr" (scale rounded up: nothing clips, so the rounding stays unbiased). The mask is None when nothing can clip.
    Dims must be multiples of the block (zero-pad first).
    """
    group = MX_GROUP if fmt == "mxfp4" else NV_GROUP
    r, c = x.shape
    if c % group or r % block_rows:
        raise ValueError(f"{fmt} needs [R, C] multiples of [{block_rows}, {group}], got {(r, c)}; zero-pad first")
    if fmt == "nvfp4" and tensor_scale is None:
        raise ValueError("nvfp4 needs tensor_scale; compute it with nvfp4_tensor_scale_ref(x)")
    xf = x.float()
    # [R/br, br, C/g, g] -> blocks [R/br, C/g, br*g]
    blocks = xf.view(r // block_rows, block_rows, c // group, group).transpose(1, 2)
    blocks = blocks.reshape(r // block_rows, c // group, block_rows * group)
    scale = _fp4_block_scale(blocks, fmt, rule, tensor_scale)
    q = torch.where(scale > 0, blocks / torch.where(scale > 0, scale, 1.0), 0.0)
    mask = None
    if fmt == "mxfp4" and rule == "rtn":
        mask = q.abs() <= FP4_MAX
    a = q.abs().clamp_max(FP4_MAX)
    if rule == "sr":
        if noise is None:
            raise ValueError("stochastic rounding needs `noise` ~ U[0, 1) of x's shape")
        nz = noise.float().view(r // block_rows, block_rows, c // group, group).transpose(1, 2)
        a = e2m1_round_ref(a, nz.reshape(a.shape))
    else:
        a = e2m1_round_ref(a)
    out = torch.copysign(a, q) * scale

    def unblock(t):
        t = t.view(r // block_rows, c // group, block_rows, group).transpose(1, 2)
        return t.reshape(r, c)

    return unblock(out), (unblock(mask) if mask is not None else None)


def quantize_weight_fp8(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The `--weights fp8` store format of a 2-D weight [N, K].

    Returns (codes float8_e4m3fn [N, K], scales fp32 [ceil(N/128), ceil(K/128)]); view the codes as
    uint8 to write them. value = code * scale of its 128x128 tile (edge tiles are partial).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_fp8 takes a 2-D weight, got shape {tuple(w.shape)}")
    return weight_quant_ref(w, pow2)


def dequantize_weight_fp8(codes: torch.Tensor, scales: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of quantize_weight_fp8: fp32 tensor of `shape` ([N, K]) from codes (uint8 or fp8)."""
    n, k = (int(d) for d in shape)
    if codes.dtype == torch.uint8:
        codes = codes.view(FP8_DTYPE)
    if codes.dtype != FP8_DTYPE:
        raise ValueError(f"fp8 weight codes must be uint8 or float8_e4m3fn, got {codes.dtype}")
    codes = codes.reshape(n, k)
    want = ((n + FP8_GROUP - 1) // FP8_GROUP, (k + FP8_GROUP - 1) // FP8_GROUP)
    if tuple(scales.shape) != want:
        raise ValueError(f"fp8 weight scales must have shape {want} for weight {(n, k)}, got {tuple(scales.shape)}")
    return weight_dequant_ref(codes, scales.float())
