"""The torch references themselves: quantizer round trips, codes, scale rules, odd shapes, zeros."""
import math

import pytest
import torch

from fuyou.kernels import dequantize_weight_fp8, quantize_weight_fp8
from fuyou.kernels import reference as ref

# Shapes: size 1, below/above one block, non-multiples of 128, several blocks.
SHAPES = [(1, 1), (1, 128), (3, 127), (5, 129), (130, 200), (64, 256)]


def _fp8_bound(x, scale):
    """Worst-case E4M3 rounding error: half an ulp (2**-4 relative, 2**-10 * scale subnormal)."""
    return torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_ref_roundtrip_and_scales(shape, pow2):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    codes, scales = ref.act_quant_ref(x, pow2)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scales.shape == (shape[0], math.ceil(shape[1] / 128))
    for g in range(scales.shape[1]):
        block = x[:, g * 128:(g + 1) * 128]
        want = block.abs().amax(dim=1) / 448.0
        if pow2:
            want = torch.tensor([2.0 ** math.ceil(math.log2(v)) for v in want.tolist()])
        torch.testing.assert_close(scales[:, g], want, rtol=0, atol=0)
        # Codes are exactly torch's own fp8 cast of x / scale.
        torch.testing.assert_close(codes[:, g * 128:(g + 1) * 128].float(),
                                   (block / want[:, None]).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
    deq = ref.act_dequant_ref(codes, scales)
    bound = _fp8_bound(x, scales.repeat_interleave(128, 1)[:, : shape[1]])
    assert ((deq - x).abs() <= bound).all()
    # The group amax lands exactly on ±448 (non-pow2 scales).
    if not pow2:
        assert codes.float().abs().amax(dim=1).eq(448).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_weight_quant_ref_roundtrip_and_scales(shape, pow2):
    torch.manual_seed(1)
    w = torch.randn(shape)
    codes, scales = ref.weight_quant_ref(w, pow2)
    assert scales.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    tile_amax = w[:128, :128].abs().amax()
    want = tile_amax / 448.0
    if pow2:
        want = torch.tensor(2.0 ** math.ceil(math.log2(want.item())))
        assert torch.equal(scales, ref.pow2_ceil(scales))  # every scale a power of two
    torch.testing.assert_close(scales[0, 0], want, rtol=0, atol=0)
    deq = ref.weight_dequant_ref(codes, scales)
    full = scales.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert ((deq - w).abs() <= _fp8_bound(w, full)).all()


def test_zeros_and_tiny_values_quantize_to_zero_codes():
    x = torch.zeros(4, 200)
    codes, scales = ref.act_quant_ref(x)
    assert codes.float().eq(0).all() and torch.isfinite(scales).all() and (scales > 0).all()
    wc, ws = ref.weight_quant_ref(torch.zeros(129, 3), pow2=True)
    assert wc.float().eq(0).all() and torch.isfinite(ws).all()
    torch.testing.assert_close(ref.act_dequant_ref(codes, scales), x, rtol=0, atol=0)


def test_weight_store_format_roundtrip_through_uint8():
    torch.manual_seed(2)
    w = torch.randn(300, 130, dtype=torch.bfloat16)
    codes, scales = quantize_weight_fp8(w)
    stored = codes.view(torch.uint8).clone()
    back = dequantize_weight_fp8(stored, scales, w.shape)
    assert back.dtype == torch.float32 and back.shape == (300, 130)
    torch.testing.assert_close(back, ref.weight_dequant_ref(codes, scales), rtol=0, atol=0)
    assert ((back - w.float()).abs() <= _fp8_bound(w.float(), scales.max())).all()


def test_weight_store_format_rejects_bad_input():
    codes, scales = quantize_weight_fp8(torch.randn(200, 100))
    with pytest.raises(ValueError, match="scales must have shape"):
        dequantize_weight_fp8(codes, scales[:1], (200, 100))
    with pytest.raises(ValueError, match="uint8 or float8"):
        dequantize_weight_fp8(codes.float(), scales, (200, 100))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_fp8(torch.randn(4, 4, 4))


def test_fp8_gemm_ref_matches_dequantized_matmul_for_every_layout():
    torch.manual_seed(3)
    x, w = torch.randn(9, 200), torch.randn(130, 200)
    xq, xs = ref.act_quant_ref(x)
    wq, ws = ref.weight_quant_ref(w)
    y = ref.fp8_gemm_ref(xq, xs, wq.t(), ws, 128)
    torch.testing.assert_close(y, ref.act_dequant_ref(xq, xs) @ ref.weight_dequant_ref(wq, ws).t())
    xtq, xts = ref.act_quant_ref(x.t())  # [K, M] grouped along tokens; B = X, 128x1 groups
    dy = torch.randn(9, 130)
    gtq, gts = ref.act_quant_ref(dy.t())
    dw = ref.fp8_gemm_ref(gtq, gts, xtq.t(), xts, 1)
    torch.testing.assert_close(dw, ref.act_dequant_ref(gtq, gts) @ ref.act_dequant_ref(xtq, xts).t())


@pytest.mark.parametrize("block", [16, 32])
def test_hadamard_ref_is_orthonormal_and_invertible(block):
    torch.manual_seed(4)
    x = torch.randn(5, 3 * block)
    h = ref.hadamard_matrix(block)
    torch.testing.assert_close(h @ h.t(), torch.eye(block), rtol=0, atol=1e-6)
    signs = torch.randint(0, 2, (block,)).float() * 2 - 1
    y = ref.hadamard_ref(x, block, signs)
    torch.testing.assert_close(y.norm(), x.norm(), rtol=1e-6, atol=0)
    # Rotating both GEMM operands along the reduction dim cancels.
    b = torch.randn(7, 3 * block)
    torch.testing.assert_close(y @ ref.hadamard_ref(b, block, signs).t(), x @ b.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        ref.hadamard_ref(torch.randn(2, block + 1), block)


def test_e2m1_rounding_grid_and_unbiased_stochastic_rounding():
    grid = torch.tensor(ref.E2M1_GRID)
    a = torch.linspace(0, 6, 1201)
    rtn = ref.e2m1_round_ref(a)
    nearest = grid[(a[:, None] - grid).abs().argmin(1)]
    # Nearest everywhere except exact midpoints, where ties go toward zero.
    mids = torch.isin(a, (grid[1:] + grid[:-1]) / 2)
    assert torch.equal(rtn[~mids], nearest[~mids])
    assert torch.equal(rtn[mids], grid[(a[mids, None] - grid).abs().argmin(1)])
    torch.manual_seed(5)
    reps = 4096
    sr = ref.e2m1_round_ref(a.repeat(reps, 1), torch.rand(reps, a.numel()))
    assert torch.isin(sr, grid).all()
    # Mean of 4096 draws: std <= 1 (largest gap 2) / 2 / 64; 6 sigma.
    torch.testing.assert_close(sr.mean(0), a, rtol=0, atol=6 / 128)


@pytest.mark.parametrize("fmt,rule,rows", [("mxfp4", "rtn", 1), ("mxfp4", "sr", 1), ("nvfp4", "rtn", 1),
                                           ("nvfp4", "sr", 1), ("nvfp4", "rtn", 16)])
def test_fp4_quant_ref_values_lie_on_the_scaled_grid(fmt, rule, rows):
    torch.manual_seed(6)
    x = torch.randn(32, 64)
    ts = ref.nvfp4_tensor_scale_ref(x) if fmt == "nvfp4" else None
    noise = torch.rand_like(x) if rule == "sr" else None
    y, mask = ref.fp4_quant_ref(x, fmt, rule, noise, ts, rows)
    group = 32 if fmt == "mxfp4" else 16

    def blocked(t):
        return t.view(32 // rows, rows, 64 // group, group).transpose(1, 2).reshape(-1, rows * group)

    blocks, xb = blocked(y), blocked(x)
    if fmt == "nvfp4":
        scale = ref.round_e4m3_ref(xb.abs().amax(1, keepdim=True) / 6 / ts, up=rule == "sr") * ts
        torch.testing.assert_close(y.abs().amax(), x.abs().amax(), rtol=1e-6, atol=0)  # amax exact
    elif rule == "rtn":
        mean, msq = xb.mean(1, keepdim=True), (xb * xb).mean(1, keepdim=True)
        scale = ref.pow2_floor(ref.QUEST_GAUSSIAN_SCALE * (msq - mean * mean).sqrt() + 1e-8)
        assert torch.equal(blocked(mask), (xb / scale).abs() <= 6)
    else:
        scale = ref.pow2_ceil(xb.abs().amax(1, keepdim=True) / 6)
    assert (mask is None) == (fmt != "mxfp4" or rule != "rtn")
    q = (blocks / scale).abs()
    grid = torch.tensor(ref.E2M1_GRID)
    # Exact grid points for power-of-two scales; within fp32 rounding of y = a * scale for NVFP4.
    torch.testing.assert_close(q, grid[(q[..., None] - grid).abs().argmin(-1)], rtol=1e-6, atol=0)


def test_fp4_quant_ref_rejects_partial_blocks():
    with pytest.raises(ValueError, match="zero-pad"):
        ref.fp4_quant_ref(torch.randn(4, 40), "mxfp4")
    with pytest.raises(ValueError, match="tensor_scale"):
        ref.fp4_quant_ref(torch.randn(4, 32), "nvfp4")


def test_fp8_store_roundtrip_is_idempotent_with_pow2_scales():
    """Re-quantizing stored fp8 weights (dequantized for compute) reproduces the same codes."""
    torch.manual_seed(7)
    w = torch.randn(200, 260)
    codes, scales = quantize_weight_fp8(w, pow2=True)
    codes2, scales2 = quantize_weight_fp8(dequantize_weight_fp8(codes, scales, w.shape), pow2=True)
    torch.testing.assert_close(scales2, scales, rtol=0, atol=0)
    torch.testing.assert_close(codes2.float(), codes.float(), rtol=0, atol=0)
