"""Low-precision linear layers: Y = X·Wᵀ (+ b) with forward and backward GEMMs in FP8 or emulated FP4.

Recipes (docs/kernels.md has the full description and the tolerances):
- "fp8-blockwise" (DeepSeek-V3): X 1x128 along K, W 128x128 tiles; dgrad dX = dY·W with dY 1x128
  along N and W's forward tiles reused transposed (never requantized); wgrad dW = dYᵀ·X with both
  quantized 1x128 along M (tokens) from the high-precision source.
- "mxfp4" (Quartet): forward on 32-wide block-Hadamard-rotated operands quantized with QuEST
  (round to nearest, clip, gradient zeroed where clipped); backward operands re-rotated with
  random-sign Hadamards along the reduction dim and stochastically rounded.
- "nvfp4" (NVIDIA): 1x16 blocks (16x16 for W) with E4M3 scales and an fp32 tensor scale; dY
  stochastically rounded; wgrad operands random-Hadamard (16) rotated along M.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import reference as ref
from ._triton import HAS_TRITON, triton_usable
from .ops import KernelOps, emulated_matmul, reference_ops, triton_ops

RECIPES = ("fp8-blockwise", "mxfp4", "nvfp4")
BACKENDS = ("auto", "triton", "reference")
# Dims (K = in_features, N = out_features) that fill whole quantization blocks, per recipe.
RECIPE_BLOCK = {"fp8-blockwise": ref.FP8_GROUP, "mxfp4": ref.MX_GROUP, "nvfp4": ref.NV_GROUP}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowPrecisionConfig:
    """How convert_to_low_precision runs the swapped linear layers."""

    recipe: str = "fp8-blockwise"  # fp8-blockwise | mxfp4 | nvfp4
    pow2_scales: bool = False  # fp8-blockwise: round scales up to powers of two (exact rescaling)
    strict_shapes: bool = False  # refuse in/out features that are not block multiples (else zero-pad)
    backend: str = "auto"  # auto: Triton on CUDA, reference (dequantize + fp32 matmul) elsewhere

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown low-precision recipe {self.recipe!r}; choose one of {RECIPES}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.backend == "triton" and not HAS_TRITON:
            raise ValueError("backend='triton' needs triton installed; use backend='auto' or 'reference'")
        if self.pow2_scales and self.recipe != "fp8-blockwise":
            raise ValueError("pow2_scales applies to fp8-blockwise only (FP4 scales are fixed by the format)")

    @property
    def block(self) -> int:
        return RECIPE_BLOCK[self.recipe]


def check_shape(config: LowPrecisionConfig, in_features: int, out_features: int, name: str = "linear") -> None:
    """Under strict_shapes, raise unless both features are multiples of the recipe's block."""
    b = config.block
    if config.strict_shapes and (in_features % b or out_features % b):
        raise ValueError(
            f"{name}: in_features={in_features}, out_features={out_features} are not multiples of {b} "
            f"({config.recipe}); set strict_shapes=False to zero-pad partial blocks"
        )


def _pad2d(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    extra_r, extra_c = (-t.shape[0]) % rows, (-t.shape[1]) % cols
    return F.pad(t, (0, extra_c, 0, extra_r)) if extra_r or extra_c else t


def _random_signs(n: int, device) -> torch.Tensor:
    return torch.randint(0, 2, (n,), device=device).float() * 2 - 1


class _Fp8BlockwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ops: KernelOps, pow2: bool, need_wgrad: bool, w_fp8):
        xq, xs = ops.act_quant(x, pow2)
        # Stored fp8 weights are the very tiles the GEMM wants: never requantize them.
        wq, ws = w_fp8 if w_fp8 is not None else ops.weight_quant(w, pow2)
        # Fast accumulation (within each 128-K block) only in the forward.
        y = ops.fp8_gemm(xq, xs, wq.t(), ws, ref.FP8_GROUP, torch.float32, True)
        # wgrad needs X grouped along tokens: quantize now from the source and keep only the codes.
        xtq, xts = ops.act_quant(x.t(), pow2) if need_wgrad else (None, None)
        ctx.save_for_backward(wq, ws, xtq, xts)
        ctx.ops, ctx.pow2, ctx.x_dtype, ctx.w_dtype = ops, pow2, x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        wq, ws, xtq, xts = ctx.saved_tensors
        ops, pow2 = ctx.ops, ctx.pow2
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq, gs = ops.act_quant(dy, pow2)  # 1x128 along N, the dgrad reduction dim
            # B = W [N, K]: reduction over N; W's 128x128 tile scales read transposed.
            dx = ops.fp8_gemm(gq, gs, wq, ws.t(), ref.FP8_GROUP, torch.float32).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gtq, gts = ops.act_quant(dy.t(), pow2)  # dYᵀ [N, M], 1x128 along M
            # B = X [M, K] from Xᵀ's codes; one scale per (column k, 128-token block): b_group=1.
            dw = ops.fp8_gemm(gtq, gts, xtq.t(), xts, 1, torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None, None, None


class _Fp4Fn(torch.autograd.Function):
    """Emulated FP4 linear (no bias), inputs already zero-padded to whole blocks."""

    @staticmethod
    def forward(ctx, x, w, ops: KernelOps, fmt: str):
        if fmt == "mxfp4":
            xq, mx = ops.fp4(ops.hadamard(x, ref.MX_GROUP, None), fmt, "rtn")
            wq, mw = ops.fp4(ops.hadamard(w, ref.MX_GROUP, None), fmt, "rtn")
            y = emulated_matmul(xq, wq.t())
            ctx.save_for_backward(xq, wq, mx, mw)
        else:
            ts_x, ts_w = ref.nvfp4_tensor_scale_ref(x), ref.nvfp4_tensor_scale_ref(w)
            xq, _ = ops.fp4(x, fmt, "rtn", ts_x)
            wq, _ = ops.fp4(w, fmt, "rtn", ts_w, block_rows=ref.NV_GROUP)
            y = emulated_matmul(xq, wq.t(), ts_x, ts_w)
            # wgrad requantizes X along tokens from its source, so the source is kept.
            ctx.save_for_backward(x, wq, ts_w)
        ctx.ops, ctx.fmt, ctx.x_dtype, ctx.w_dtype = ops, fmt, x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        backward = _mxfp4_backward if ctx.fmt == "mxfp4" else _nvfp4_backward
        dx, dw = backward(ctx, dy.float(), *ctx.needs_input_grad[:2])
        dx = dx.to(ctx.x_dtype) if dx is not None else None
        dw = dw.to(ctx.w_dtype) if dw is not None else None
        return dx, dw, None, None


def _sr_product(ops: KernelOps, a: torch.Tensor, b: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """a @ bᵀ, both [*, R] rotated by one random-sign Hadamard along R and stochastically rounded."""
    signs = _random_signs(block, a.device)
    if fmt == "mxfp4":
        aq, _ = ops.fp4(ops.hadamard(a, block, signs), fmt, "sr")
        bq, _ = ops.fp4(ops.hadamard(b, block, signs), fmt, "sr")
        return emulated_matmul(aq, bq.t())
    ah, bh = ops.hadamard(a, block, signs), ops.hadamard(b, block, signs)
    ts_a, ts_b = ref.nvfp4_tensor_scale_ref(ah), ref.nvfp4_tensor_scale_ref(bh)
    aq, _ = ops.fp4(ah, fmt, "sr", ts_a)
    # NVIDIA's recipe rounds only gradients stochastically; the activation side is RTN.
    bq, _ = ops.fp4(bh, fmt, "rtn", ts_b)
    return emulated_matmul(aq, bq.t(), ts_a, ts_b)


def _mxfp4_backward(ctx, dy, want_dx: bool, want_dw: bool):
    xq, wq, mx, mw = ctx.saved_tensors
    ops, g = ctx.ops, ref.MX_GROUP
    dx = dw = None
    # Gradients w.r.t. the rotated operands; STE through the quantizer except where QuEST clipped;
    # then back through the (symmetric, orthonormal) forward Hadamard.
    if want_dx:
        dx = ops.hadamard(_sr_product(ops, dy, wq.t().contiguous(), "mxfp4", g) * mx, g, None)
    if want_dw:
        dw = ops.hadamard(_sr_product(ops, dy.t().contiguous(), xq.t().contiguous(), "mxfp4", g) * mw, g, None)
    return dx, dw


def _nvfp4_backward(ctx, dy, want_dx: bool, want_dw: bool):
    x, wq, ts_w = ctx.saved_tensors
    ops = ctx.ops
    dx = dw = None
    if want_dx:
        ts_g = ref.nvfp4_tensor_scale_ref(dy)
        gq, _ = ops.fp4(dy, "nvfp4", "sr", ts_g)
        # W's 16x16 blocks are the same blocks read transposed: no requantization for dgrad.
        dx = emulated_matmul(gq, wq, ts_g, ts_w)
    if want_dw:
        dw = _sr_product(ops, dy.t().contiguous(), x.float().t().contiguous(), "nvfp4", ref.NV_GROUP)
    return dx, dw


def _check_weight_fp8(weight_fp8, config: LowPrecisionConfig, shape: tuple[int, int]):
    if config.recipe != "fp8-blockwise":
        raise ValueError(f"weight_fp8 (stored fp8 weights) needs recipe fp8-blockwise, not {config.recipe}")
    codes, scales = weight_fp8
    if codes.dtype == torch.uint8:
        codes = codes.view(ref.FP8_DTYPE)
    n, k = shape
    want = (-(-n // ref.FP8_GROUP), -(-k // ref.FP8_GROUP))
    if codes.dtype != ref.FP8_DTYPE or tuple(codes.shape) != shape or tuple(scales.shape) != want:
        raise ValueError(
            f"weight_fp8 must be (uint8/float8_e4m3fn codes {shape}, fp32 scales {want}) as made by "
            f"quantize_weight_fp8, got {codes.dtype} {tuple(codes.shape)} and {tuple(scales.shape)}"
        )
    return codes, scales.float()


def select_ops(config: LowPrecisionConfig, device: torch.device) -> KernelOps:
    if config.backend == "reference" or (config.backend == "auto" and not (HAS_TRITON and device.type == "cuda")):
        return reference_ops()
    if not triton_usable(device):
        raise RuntimeError(f"backend='triton' cannot run on {device}: use CUDA, TRITON_INTERPRET=1 or backend='reference'")
    return triton_ops()


def low_precision_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: LowPrecisionConfig,
    ops: KernelOps | None = None,
    weight_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) with the GEMMs of `config.recipe` (differentiable in x and weight).

    x [..., K], weight [N, K]; the result has x's dtype. `ops` overrides the kernel set.
    weight_fp8: (codes, scales) of the weight in the `--weights fp8` store format
    (quantize_weight_fp8), fp8-blockwise only: the GEMMs use them as they are instead of
    quantizing `weight`, which then only gives shape, dtype and requires_grad (the gradient is
    w.r.t. the dequantized weight).
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    check_shape(config, k, n)
    ops = ops or select_ops(config, x.device)
    if weight_fp8 is not None:
        weight_fp8 = _check_weight_fp8(weight_fp8, config, (n, k))
    x2 = x.reshape(-1, k)
    if config.recipe == "fp8-blockwise":
        # Partial 128-blocks are zero-filled inside the kernels/references: no copy needed.
        # Forward runs with grad mode off inside the Function: decide here whether wgrad will come.
        need_wgrad = torch.is_grad_enabled() and weight.requires_grad
        y = _Fp8BlockwiseFn.apply(x2, weight, ops, config.pow2_scales, need_wgrad, weight_fp8)
    else:
        g = config.block
        xp, wp = _pad2d(x2, g, g), _pad2d(weight, g, g)
        y = _Fp4Fn.apply(xp, wp, ops, config.recipe)[: x2.shape[0], :n]
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)
