"""@triton.jit building blocks shared by the kernels (exact bit tricks instead of log2/exp2).

tl.log2 / tl.exp2 are approximate on the GPU, so power-of-two scales are built from the fp32
exponent bits, which is exact and matches torch.frexp in reference.py.
"""
import triton
import triton.language as tl


@triton.jit
def pow2_ceil(s):
    """2**ceil(log2(s)) for positive normal fp32 s."""
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    exp = tl.where((bits & 0x7FFFFF) != 0, exp + 1, exp)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_floor(s):
    """2**floor(log2(s)) for positive normal fp32 s."""
    bits = s.to(tl.int32, bitcast=True)
    return (bits & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(v, UP: tl.constexpr):
    """Round non-negative fp32 v to E4M3 (3 mantissa bits, subnormal step 2**-9, max 448),
    to nearest or (UP) to the next value up.

    Nearest ties round up here and to even in torch's cast; the two differ only on exact ties.
    """
    v = tl.minimum(v, 448.0)
    bits = v.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
    if UP:
        r = tl.ceil(tl.math.div_rn(v, step)) * step
    else:
        r = tl.floor(tl.math.div_rn(v, step) + 0.5) * step
    return tl.minimum(r, 448.0)


@triton.jit
def e2m1_rtn(a):
    """Nearest E2M1 magnitude of a in [0, 6], ties toward zero (as e2m1_round_ref)."""
    return tl.where(a > 5.0, 6.0, tl.where(a > 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(
        a > 1.75, 2.0, tl.where(a > 1.25, 1.5, tl.where(a > 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0)))))))


@triton.jit
def e2m1_sr(a, u):
    """Stochastic E2M1 rounding of a in [0, 6]: up with probability (a - lo) / (hi - lo), u ~ U[0, 1)."""
    lo = tl.where(a > 4.0, 4.0, tl.where(a > 3.0, 3.0, tl.where(a > 2.0, 2.0, tl.where(
        a > 1.5, 1.5, tl.where(a > 1.0, 1.0, tl.where(a > 0.5, 0.5, 0.0))))))
    hi = tl.where(a > 4.0, 6.0, tl.where(a > 3.0, 4.0, tl.where(a > 2.0, 3.0, tl.where(
        a > 1.5, 2.0, tl.where(a > 1.0, 1.5, tl.where(a > 0.5, 1.0, 0.5))))))
    # hi - lo is a power of two: the correctly rounded division is exact (the default one may not be).
    p = tl.math.div_rn(a - lo, hi - lo)
    return tl.where(u < p, hi, lo)


# Globals read inside @triton.jit functions must be constexpr.
FP8_MAX_C = tl.constexpr(448.0)
AMAX_EPS_C = tl.constexpr(1e-12)
