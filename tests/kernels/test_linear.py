"""The low-precision linear autograd Function: Triton path vs reference path, and vs fp32."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fuyou.kernels import (LowPrecisionConfig, dequantize_weight_fp8, low_precision_linear, quantize_weight_fp8,
                          reference_ops, triton_ops)
from fuyou.kernels import reference as ref

RECIPES = ["fp8-blockwise", "mxfp4", "nvfp4"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_ACCUM_REL_ATOL = 2e-3  # as TOLERANCES["fp8_gemm_fast_accum"] in test_triton_kernels.py

# Triton path vs reference path, element-wise: (rtol, atol, reason).
PATH_TOLERANCE = {
    "fp8-blockwise": (1e-5, 1e-4, "same fp8 codes and scales; the GEMMs differ only in fp32 summation order"),
    "mxfp4": (1e-5, 1e-4, "same FP4 values (same noise); Hadamard dot and matmul summation order only"),
    "nvfp4": (1e-5, 1e-4, "same FP4 values (same noise); matmul summation order only"),
}
# On sm_90 the fp8 forward GEMM accumulates each 128-product block in the tensor core's ~14-bit
# precision (fast accumulation, forward only); the reference sums in fp32. atol = this x rms(y).
FAST_ACCUM_REL_ATOL = 2e-3
# Low precision vs the fp32 F.linear, as max |err| / rms(fp32 result), for y, dx, dw (inputs ~N(0,1),
# W ~ N(0, 1/K)). Measured over 3 seeds at these shapes: fp8 <= 0.19, mxfp4 <= 2.0, nvfp4 <= 0.90.
# fp8 (> 1e-1): E4M3 keeps 3 mantissa bits (half-ulp 6.25%), so the relative rms error of a
# product is ~3.6% and the largest of ~10^4 outputs reaches ~5 rms.
FP8_VS_FP32_ELEMENTWISE = 0.3
# FP4 is compared by relative Frobenius error, because one FP4 element is off by up to half a grid
# step (up to 17% of the block scale range) and the MXFP4 backward also zeroes clipped entries
# (QuEST's masked straight-through estimator), so single elements may be off by more than the rms.
# Measured: mxfp4 y 0.22 / grads 0.37 (SR noise + clip masks), nvfp4 y 0.15 / grads 0.19.
FP4_VS_FP32_RELATIVE = {"mxfp4": (0.3, 0.5), "nvfp4": (0.2, 0.3)}


def _triton_path_ops():
    """Triton GEMM/Hadamard/FP4 kernels; FP8 quantizers from torch (interpreter casts are wrong)."""
    ops = triton_ops(torch_noise=True)
    if torch.cuda.is_available():
        return ops
    return dataclasses.replace(ops, act_quant=ref.act_quant_ref, weight_quant=ref.weight_quant_ref)


def _run(recipe, ops, x, w, b, dy, seed=7):
    torch.manual_seed(seed)  # same Hadamard signs and stochastic-rounding noise on both paths
    y = low_precision_linear(x, w, b, LowPrecisionConfig(recipe=recipe), ops)
    return (y, *torch.autograd.grad(y, (x, w, b), dy))


def _inputs(m, n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE).requires_grad_()
    b = torch.randn(n, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(2, m, n, generator=g).to(DEVICE, dtype)
    return x, w, b, dy


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (25, 150, 200)])
def test_triton_path_matches_reference_path(recipe, m, n, k):
    pytest.importorskip("triton")
    x, w, b, dy = _inputs(m, n, k)
    got = _run(recipe, _triton_path_ops(), x, w, b, dy)
    want = _run(recipe, reference_ops(), x, w, b, dy)
    rtol, atol, _ = PATH_TOLERANCE[recipe]
    for i, (g, r) in enumerate(zip(got, want)):
        if i == 0 and recipe == "fp8-blockwise" and DEVICE == "cuda":
            torch.testing.assert_close(g, r, rtol=0, atol=FAST_ACCUM_REL_ATOL * r.pow(2).mean().sqrt().item())
        else:
            torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_blockwise_close_to_fp32_elementwise(seed):
    x, w, b, dy = _inputs(50, 150, 200, seed)
    got = _run("fp8-blockwise", reference_ops(), x, w, b, dy)
    y = F.linear(x, w, b)
    want = (y, *torch.autograd.grad(y, (x, w, b), dy))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=FP8_VS_FP32_ELEMENTWISE * r.pow(2).mean().sqrt().item())


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4"])
def test_fp4_close_to_fp32_in_relative_norm(recipe):
    x, w, b, dy = _inputs(50, 150, 200, 3)
    y = low_precision_linear(x, w, b, LowPrecisionConfig(recipe=recipe)) - b.detach()
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    yt = F.linear(x, w)
    gxt, gwt = torch.autograd.grad(yt, (x, w), dy)
    fwd, bwd = FP4_VS_FP32_RELATIVE[recipe]
    assert (y - yt).norm() / yt.norm() < fwd
    assert (gx - gxt).norm() / gxt.norm() < bwd
    assert (gw - gwt).norm() / gwt.norm() < bwd
    torch.testing.assert_close(gb, dy.sum((0, 1)))  # the bias gradient is exact (fp32)


def test_fp8_forward_is_the_dequantized_product():
    """Independent of the Function plumbing: y equals dequant(X) dequant(W)ᵀ of the references."""
    x, w, _, _ = _inputs(30, 130, 140)
    y = low_precision_linear(x, w, None, LowPrecisionConfig(recipe="fp8-blockwise", pow2_scales=True))
    xd = ref.act_dequant_ref(*ref.act_quant_ref(x.reshape(-1, 140), pow2=True))
    wd = ref.weight_dequant_ref(*ref.weight_quant_ref(w, pow2=True))
    want = xd @ wd.t()
    if DEVICE == "cuda":
        # The forward GEMM runs with fast accumulation: sm_90 fp8 MMAs keep ~14 bits within each
        # 128-K block; the bound of test_triton_kernels' fp8_gemm_fast_accum check, on the RMS.
        atol = FAST_ACCUM_REL_ATOL * want.pow(2).mean().sqrt().item()
    else:
        atol = 1e-5  # the interpreter and the reference accumulate in fp32
    torch.testing.assert_close(y.reshape(-1, 130), want, rtol=1e-5, atol=atol)


def test_dtype_frozen_weight_and_no_grad():
    x, w, b, dy = _inputs(9, 128, 128, dtype=torch.bfloat16)
    w.requires_grad_(False)
    y = low_precision_linear(x, w, b, LowPrecisionConfig())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 128)
    (gx,) = torch.autograd.grad(y, (x,), dy)
    assert gx.dtype == torch.bfloat16 and torch.isfinite(gx.float()).all()
    for recipe in ("mxfp4", "nvfp4"):
        y_fp4 = low_precision_linear(x, w, b, LowPrecisionConfig(recipe=recipe))
        (gx_fp4,) = torch.autograd.grad(y_fp4, (x,), dy)
        assert gx_fp4.dtype == torch.bfloat16 and torch.isfinite(gx_fp4.float()).all()
    with torch.no_grad():
        y2 = low_precision_linear(x, w, b, LowPrecisionConfig(recipe="nvfp4"))
    assert y2.shape == y.shape


def test_strict_shapes_refuses_partial_blocks_and_pad_accepts_them():
    x, w, b, _ = _inputs(4, 150, 200)
    with pytest.raises(ValueError, match="not multiples of 128.*strict_shapes=False"):
        low_precision_linear(x, w, b, LowPrecisionConfig(strict_shapes=True))
    assert low_precision_linear(x, w, b, LowPrecisionConfig()).shape == (2, 4, 150)
    x2, w2, b2, _ = _inputs(4, 256, 128)
    assert low_precision_linear(x2, w2, b2, LowPrecisionConfig(strict_shapes=True)).shape == (2, 4, 256)
    with pytest.raises(ValueError, match="not multiples of 32"):
        low_precision_linear(x, w, b, LowPrecisionConfig(recipe="mxfp4", strict_shapes=True))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown low-precision recipe"):
        LowPrecisionConfig(recipe="fp6")
    with pytest.raises(ValueError, match="unknown backend"):
        LowPrecisionConfig(backend="cuda")
    with pytest.raises(ValueError, match="pow2_scales"):
        LowPrecisionConfig(recipe="nvfp4", pow2_scales=True)
    with pytest.raises(ValueError, match="features"):
        low_precision_linear(torch.randn(2, 3), torch.randn(4, 5), None, LowPrecisionConfig(backend="reference"))


def test_stored_fp8_weights_feed_the_gemm_directly():
    """With pow2 scales, stored codes equal the requantized dequantized weight: same results."""
    x, w, b, dy = _inputs(20, 200, 136)
    codes, scales = quantize_weight_fp8(w.detach(), pow2=True)
    w_deq = dequantize_weight_fp8(codes.view(torch.uint8), scales, w.shape).requires_grad_()
    cfg = LowPrecisionConfig(pow2_scales=True)
    y = low_precision_linear(x, w_deq, b, cfg, weight_fp8=(codes.view(torch.uint8), scales))
    got = (y, *torch.autograd.grad(y, (x, w_deq), dy))
    y2 = low_precision_linear(x, w_deq, b, cfg)
    want = (y2, *torch.autograd.grad(y2, (x, w_deq), dy))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    with pytest.raises(ValueError, match="quantize_weight_fp8"):
        low_precision_linear(x, w_deq, b, cfg, weight_fp8=(codes, scales[:1]))
    with pytest.raises(ValueError, match="needs recipe fp8-blockwise"):
        low_precision_linear(x, w_deq, b, LowPrecisionConfig(recipe="nvfp4"), weight_fp8=(codes, scales))
