"""Triton kernels against their torch references.

Without CUDA they run under TRITON_INTERPRET=1 (conftest.py) on small shapes. The interpreter casts
fp32 -> fp8 wrongly and without clipping (docs/kernels.md, "What runs where"), so on CPU the GEMM
is fed codes from the torch quantizers, and the Triton FP8 quantizer tests run on CUDA only.
"""
import pytest
import torch

from fuyou.kernels import reference as ref

triton = pytest.importorskip("triton")
from fuyou.kernels.act_quant import act_quant  # noqa: E402
from fuyou.kernels.fp4_quant import fp4_quant  # noqa: E402
from fuyou.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from fuyou.kernels.hadamard import hadamard  # noqa: E402
from fuyou.kernels.weight_quant import weight_quant  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton fp8 casts are wrong in the CPU interpreter")

# name: (rtol, atol, reason)
TOLERANCES = {
    "fp8_gemm": (1e-5, 1e-4, "same fp8 products in fp32, only the summation order differs"),
    "hadamard": (1e-5, 1e-5, "fp32 block dot (ieee) vs torch matmul: summation order"),
    "exact": (0, 0, "same fp32 operations on the same inputs"),
    # atol as a fraction of rms(expected); only differs from fp8_gemm on sm_90.
    "fp8_gemm_fast_accum": (0, 2e-3, "sm_90 fp8 MMAs accumulate with ~14 bits within each 128-K block"),
}


def _close(actual, expected, kind):
    rtol, atol, _ = TOLERANCES[kind]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# (M, N, K): size 1, non-multiples of 128 on every dim, several blocks.
GEMM_SHAPES = [(1, 128, 128), (33, 150, 200), (128, 256, 256), (70, 1, 129), (2, 3, 1)]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_fp8_gemm_forward_dgrad_wgrad_layouts(m, n, k):
    torch.manual_seed(0)
    x, w, dy = torch.randn(m, k, device=DEVICE), torch.randn(n, k, device=DEVICE), torch.randn(m, n, device=DEVICE)
    xq, xs = ref.act_quant_ref(x)
    wq, ws = ref.weight_quant_ref(w)
    # forward Y = X Wᵀ: B = Wᵀ (strided view), 128x128 tiles
    _close(fp8_gemm(xq, xs, wq.t(), ws, 128), ref.fp8_gemm_ref(xq, xs, wq.t(), ws, 128), "fp8_gemm")
    # dgrad dX = dY W: reduction over N, W's tile scales transposed
    gq, gs = ref.act_quant_ref(dy)
    _close(fp8_gemm(gq, gs, wq, ws.t(), 128), ref.fp8_gemm_ref(gq, gs, wq, ws.t(), 128), "fp8_gemm")
    # wgrad dW = dYᵀ X: both grouped along M, B scales 128x1
    gtq, gts = ref.act_quant_ref(dy.t())
    xtq, xts = ref.act_quant_ref(x.t())
    _close(fp8_gemm(gtq, gts, xtq.t(), xts, 1), ref.fp8_gemm_ref(gtq, gts, xtq.t(), xts, 1), "fp8_gemm")


def test_fp8_gemm_fast_accumulation():
    torch.manual_seed(5)
    x, w = torch.randn(96, 384, device=DEVICE), torch.randn(160, 384, device=DEVICE)
    xq, xs = ref.act_quant_ref(x)
    wq, ws = ref.weight_quant_ref(w)
    want = ref.fp8_gemm_ref(xq, xs, wq.t(), ws, 128)
    _, rel_atol, _ = TOLERANCES["fp8_gemm_fast_accum"]
    got = fp8_gemm(xq, xs, wq.t(), ws, 128, fast_accum=True)
    torch.testing.assert_close(got, want, rtol=0, atol=rel_atol * want.pow(2).mean().sqrt().item())


def test_fp8_gemm_output_dtype_and_bad_input():
    x, w = torch.randn(4, 128, device=DEVICE), torch.randn(8, 128, device=DEVICE)
    xq, xs = ref.act_quant_ref(x)
    wq, ws = ref.weight_quant_ref(w)
    y = fp8_gemm(xq, xs, wq.t(), ws, 128, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 8)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(x, xs, wq.t(), ws, 128)
    with pytest.raises(ValueError, match="a_scales"):
        fp8_gemm(xq, xs[:, :0], wq.t(), ws, 128)
    with pytest.raises(ValueError, match="b_group"):
        fp8_gemm(xq, xs, wq.t(), ws, 64)
    with pytest.raises(ValueError, match=r"A \[M, K\]"):
        fp8_gemm(xq, xs, wq, ws, 128)


@pytest.mark.parametrize("block", [16, 32])
def test_hadamard_kernel(block):
    torch.manual_seed(1)
    x = torch.randn(70, 4 * block, device=DEVICE)
    signs = (torch.randint(0, 2, (block,), device=DEVICE) * 2 - 1).float()
    _close(hadamard(x, block, signs), ref.hadamard_ref(x, block, signs), "hadamard")
    _close(hadamard(x.t().contiguous().t(), block), ref.hadamard_ref(x, block), "hadamard")  # strided input
    with pytest.raises(ValueError, match="zero-pad"):
        hadamard(torch.randn(2, block + 8, device=DEVICE), block)


FP4_CASES = [("mxfp4", "rtn", 1), ("mxfp4", "sr", 1), ("nvfp4", "rtn", 1), ("nvfp4", "sr", 1), ("nvfp4", "rtn", 16),
             ("nvfp4", "sr", 16)]


@pytest.mark.parametrize("fmt,rule,rows", FP4_CASES)
@pytest.mark.parametrize("shape", [(16, 32), (80, 96)])
def test_fp4_quant_kernel_matches_reference(fmt, rule, rows, shape):
    torch.manual_seed(2)
    x = torch.randn(shape, device=DEVICE) * 2
    x[0, :16] = 0  # an all-zero block
    ts = ref.nvfp4_tensor_scale_ref(x) if fmt == "nvfp4" else None
    noise = torch.rand_like(x) if rule == "sr" else None
    y, mask = fp4_quant(x, fmt, rule, noise, ts, rows)
    y_ref, mask_ref = ref.fp4_quant_ref(x, fmt, rule, noise, ts, rows)
    # E4M3 scale rounding differs only on exact ties (absent from random data): exact match.
    _close(y, y_ref, "exact")
    assert (mask is None and mask_ref is None) or torch.equal(mask, mask_ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_fp4_stochastic_rounding_with_kernel_rng_is_unbiased(fmt):
    torch.manual_seed(3)
    row = torch.randn(1, 32, device=DEVICE)
    x = row.repeat(1024, 1)
    ts = ref.nvfp4_tensor_scale_ref(x) if fmt == "nvfp4" else None
    y, _ = fp4_quant(x, fmt, "sr", None, ts, 1, seed=1234)
    lo_hi = ref.fp4_quant_ref(x[:1], fmt, "sr", torch.zeros_like(row), ts)[0], \
        ref.fp4_quant_ref(x[:1], fmt, "sr", torch.ones_like(row), ts)[0]
    # Every draw is one of the two neighbours; the mean of 1024 draws is within 6 sigma of x
    # (sigma <= gap / 2 / 32, gap = the neighbours' distance).
    assert ((y == lo_hi[0]) | (y == lo_hi[1])).all()
    gap = (lo_hi[0] - lo_hi[1]).abs()
    assert ((y.mean(0) - row[0]).abs() <= 6 * gap[0] / 64 + 1e-6).all()
    assert not torch.equal(y[0], y[1]) or not torch.equal(y[1], y[2])  # draws differ between rows


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_quantizer_scales_match_reference(pow2):
    """Scales are fp32 arithmetic, which the interpreter gets right: checked everywhere.
    (The codes go through the fp32 -> fp8 cast: checked on CUDA below.)"""
    torch.manual_seed(6)
    x = torch.randn(70, 300, device=DEVICE) * 3
    x[:, 128:256] = 0  # an all-zero group
    _close(act_quant(x, pow2)[1], ref.act_quant_ref(x, pow2)[1], "exact")
    _close(act_quant(x.t(), pow2)[1], ref.act_quant_ref(x.t(), pow2)[1], "exact")
    _close(weight_quant(x, pow2)[1], ref.weight_quant_ref(x, pow2)[1], "exact")


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1), (33, 200), (256, 384)])
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_quantizers_match_reference_cuda(shape, pow2):
    torch.manual_seed(4)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 5
    codes, scales = act_quant(x, pow2)
    codes_ref, scales_ref = ref.act_quant_ref(x, pow2)
    _close(scales, scales_ref, "exact")
    _close(codes.float(), codes_ref.float(), "exact")
    codes_t, scales_t = act_quant(x.t(), pow2)  # strided: grouped along dim 0
    codes_t_ref, scales_t_ref = ref.act_quant_ref(x.t(), pow2)
    _close(scales_t, scales_t_ref, "exact")
    _close(codes_t.float(), codes_t_ref.float(), "exact")
    wc, ws = weight_quant(x, pow2)
    wc_ref, ws_ref = ref.weight_quant_ref(x, pow2)
    _close(ws, ws_ref, "exact")
    _close(wc.float(), wc_ref.float(), "exact")


def test_launchers_refuse_non_2d_input():
    with pytest.raises(ValueError, match="2-D"):
        hadamard(torch.randn(2, 2, 32, device=DEVICE), 32)
    with pytest.raises(ValueError, match="mxfp4"):
        fp4_quant(torch.randn(4, 40, device=DEVICE), "mxfp4")
