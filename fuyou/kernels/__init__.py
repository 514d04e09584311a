"""Low-precision GEMMs (blockwise FP8, emulated MXFP4/NVFP4) and the model transform using them.

Public API (imports without triton; the Triton kernels load on first use):

- convert_to_low_precision(model, recipe="fp8-blockwise", filter_fn=None) -> model
    Swap nn.Linear inside decoder blocks for LowPrecisionLinear (in place). recipe is
    "fp8-blockwise" | "mxfp4" | "nvfp4" or a LowPrecisionConfig. On CUDA the Triton kernels run;
    elsewhere the torch reference path (dequantize + fp32 matmul).
- LowPrecisionConfig(recipe=..., pow2_scales=False, strict_shapes=False, backend="auto")
- low_precision_linear(x, weight, bias, config, ops=None, weight_fp8=None) -> Tensor
    (differentiable F.linear; weight_fp8=(codes, scales) from quantize_weight_fp8 feeds stored fp8
    weights to the fp8-blockwise GEMMs without requantizing)
- quantize_weight_fp8(w [N, K], pow2=False) -> (codes float8_e4m3fn [N, K], scales fp32
    [ceil(N/128), ceil(K/128)])  -- the `--weights fp8` store format (codes viewable as uint8)
- dequantize_weight_fp8(codes uint8|float8 [N, K], scales, shape) -> fp32 [N, K]
Kernels (Triton, CUDA or TRITON_INTERPRET=1): fuyou.kernels.act_quant, weight_quant, fp8_gemm,
hadamard, fp4_quant; references: fuyou.kernels.reference (`<name>_ref`).
"""
from .linear import LowPrecisionConfig, low_precision_linear
from .ops import KernelOps, reference_ops, triton_ops
from .reference import dequantize_weight_fp8, quantize_weight_fp8
from .transform import LowPrecisionLinear, convert_to_low_precision

__all__ = [
    "KernelOps",
    "LowPrecisionConfig",
    "LowPrecisionLinear",
    "convert_to_low_precision",
    "dequantize_weight_fp8",
    "low_precision_linear",
    "quantize_weight_fp8",
    "reference_ops",
    "triton_ops",
]
