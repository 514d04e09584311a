"""The math of the stored state formats in plain PyTorch: the references the fused C++ kernel
must reproduce, and the lookup tables both share. codecs.py wraps each format as a Codec.

Moments (exp_avg `m`, exp_avg_sq `v`):
  fp32  one fp32 value per element.
  bf16  one bf16 value per element (round to nearest even).
  fp8   E4M3 codes in groups of 128 with dynamic range expansion (COAT): per group
        mx = max|x|, mn = min nonzero |x|, c = sqrt(mx*mn), k = floor(log2(448^2/2)/log2(mx/mn)*16)/16
        clamped to [1, 255/16], x' = sign(x)(|x|/c)^k, s = (mx/c)^k/448, code = e4m3(x'/s).
        The centre cancels (see below): code = e4m3(448 (|x|/mx)^k), x = mx (code/448)^(1/k).
        Stored: codes u8[n] (sign bit + E4M3 magnitude), absmax f32[G] (mx), k16 u8[G] (16*k).
        Decode: x = sign * R[k16][|code|] * mx with R[k16][q] = (e4m3(q)/448)^(1/k), the same fp32
        table the fused kernel uses, so decoding is bit-identical in both.
  de8   8-bit dynamic code (signed map for m, unsigned for v), blocks of 256 with an fp32 absmax;
        a value becomes the index of the nearest map entry of x/absmax. Stored: codes u8[n], absmax f32[B].
  log8  fp8's range expansion with the power taken on the floats' bit patterns: an 8-bit logarithmic
        code per group of 128, integer arithmetic only (see below). Stored: codes u8[n], absmax
        f32[G] (the group's max |x|), k16 u8[G] (2/k16 octave per code step).
Master weights:
  fp32      one fp32 value.
  bf16+rem  the fp32 bits split into a bf16 high half (rounded: it is a usable bf16 weight) and a
            signed 16-bit remainder; hi << 16 + remainder gives back the exact fp32 bits.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

# Elements per scale. The fused kernel has them built in (csrc/adam/adam.h kFp8Group, kDe8Block, kLog8Group).
FP8_GROUP = 128
DE8_BLOCK = 256
LOG8_GROUP = 128
E4M3_MAX = 448.0
# log2 of the dynamic range E4M3 covers with the centre at 1: log2(448^2 / 2) (COAT).
FP8_LOG_RANGE = math.log2(E4M3_MAX * E4M3_MAX / 2.0)
K16_MIN, K16_MAX = 16, 255  # k in [1, 255/16]: k >= 1 keeps the range; the cap fits a byte

# ---------------------------------------------------------------------------------------------
# Tables shared with the fused kernel (built here once, handed to it by pointer).


@lru_cache(maxsize=None)
def e4m3_values() -> torch.Tensor:
    """The fp32 value of every E4M3 code 0..255 (0x7F / 0xFF are NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()


@lru_cache(maxsize=None)
def fp8_root_table() -> torch.Tensor:
    """R[k16][q] = (e4m3(q)/448)^(16/k16) for q < 128, as fp32 [256, 128] (rows below 16 unused)."""
    q = e4m3_values()[:128].double() / E4M3_MAX
    k16 = torch.arange(256, dtype=torch.float64).clamp(min=K16_MIN)
    return q.unsqueeze(0).pow(16.0 / k16.unsqueeze(1)).float().contiguous()


@lru_cache(maxsize=None)
def dynamic_map(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit dynamic map (values ascending, 256) and the 255 midpoints between neighbours.

    Seven decades 1e-6..1: decade i holds 2^i (signed, each sign) or 2^(i+1) (unsigned) values at
    the centres of equal steps of [0.1, 1] * 10^(i-6); plus 0 and 1.
    """
    vals = [0.0, 1.0]
    for i in range(7):
        count = 2**i if signed else 2 ** (i + 1)
        decade = 10.0 ** (i - 6)
        for j in range(count):
            v = decade * (0.1 + (j + 0.5) * 0.9 / count)
            vals.append(v)
            if signed:
                vals.append(-v)
    values = torch.tensor(sorted(vals), dtype=torch.float64).float()
    assert values.numel() == 256
    mids = ((values[:-1].double() + values[1:].double()) / 2).float()
    return values.contiguous(), mids.contiguous()


@lru_cache(maxsize=None)
def de8_bucket_table(signed: bool) -> torch.Tensor:
    """The fused kernel's one-gather search table: for each value of the top 16 bits of an fp32 u
    (65536 int32 entries), the number of map midpoints below every u with those bits (bits 0-7) and
    the low 16 bits of the bucket's midpoint (bits 16-31).

    Within [-1, 1] such a bucket (a bf16 step) holds at most one midpoint, so the nearest-entry
    index of u is `lo + (mid < u)`, where mid has u's top 16 bits and the entry's low ones: the
    fused kernel's one-gather search, equal to the full binary search (checked here when the table
    is built, and by the tests). A bucket without a midpoint gets the low bits of its own largest
    value (0xFFFF above zero, 0 below), which no u of the bucket is above.
    """
    _, mids = dynamic_map(signed)
    keys = torch.arange(65536, dtype=torch.int64)

    lower, upper = f32_from_bits(keys << 16), f32_from_bits((keys << 16) | 0xFFFF)
    bmin, bmax = torch.minimum(lower, upper), torch.maximum(lower, upper)
    lo = torch.searchsorted(mids, bmin.contiguous(), side="left")
    inside = torch.searchsorted(mids, bmax.contiguous(), side="right") - lo
    used = torch.isfinite(bmin) & torch.isfinite(bmax) & (bmin >= -1) & (bmax <= 1)
    if int(inside[used].max()) > 1:
        raise RuntimeError("de8 map too dense for one-probe buckets; the fused de8 search needs a finer key")
    lo = lo.clamp(max=255)
    probe = torch.cat([mids, torch.full((1,), math.inf)])[lo]  # the first midpoint not below the bucket
    probe_bits = probe.view(torch.int32).long() & 0xFFFFFFFF
    none = torch.where(keys < 0x8000, 0xFFFF, 0)
    low = torch.where(probe_bits >> 16 == keys, probe_bits & 0xFFFF, none)
    entry = lo | (low << 16)
    return torch.where(entry >= 2**31, entry - 2**32, entry).to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# fp8 with dynamic range expansion


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as [groups, group], the last group padded with zeros (ignored by max and min-nonzero)."""
    pad = (-x.numel()) % group
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, group)
#
# With s = (mx/c)^k / 448 the centre cancels: x'/s = 448 (|x|/mx)^k and c (q s)^(1/k) =
# mx (q/448)^(1/k). So a group stores mx ("absmax") and k16; c and s follow from them
# (c = sqrt(mx*mn) is only needed to pick k, through mx/mn).


def fp8_group_params_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (absmax f32, k16 u8) of the fp32 values `x` (flat)."""
    a = _grouped(x.float().abs(), FP8_GROUP)
    mx = a.amax(dim=1)
    mn = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(dim=1)
    nonzero = mx > 0
    ratio = torch.where(nonzero, mx.double() / torch.where(nonzero, mn, 1.0).double(), 1.0)
    kq = torch.floor(FP8_LOG_RANGE / torch.log2(ratio) * 16.0)  # ratio 1 -> inf -> clamped
    k16 = torch.where(nonzero, kq.clamp(K16_MIN, K16_MAX), float(K16_MIN)).to(torch.uint8)
    return torch.where(nonzero, mx, 0.0), k16


def fp8_encode_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat fp32 `x` as fp8 (codes u8[n], absmax f32[G], k16 u8[G])."""
    n = x.numel()
    mx, k16 = fp8_group_params_ref(x)
    g = _grouped(x.float(), FP8_GROUP).double()
    k = (k16.double() / 16.0).unsqueeze(1)
    inv = torch.where(mx > 0, 1.0 / mx.double(), 0.0).unsqueeze(1)
    y = (E4M3_MAX * torch.pow(g.abs() * inv, k)).clamp(max=E4M3_MAX)
    codes = y.float().to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(g < 0, codes | 0x80, codes).reshape(-1)[:n]
    return codes, mx, k16


def fp8_decode_ref(codes: torch.Tensor, absmax: torch.Tensor, k16: torch.Tensor, numel: int) -> torch.Tensor:
    codes = codes.to(torch.int64)
    group = torch.arange(numel) // FP8_GROUP
    k16 = k16.to(torch.int64)[group]
    mag = fp8_root_table()[k16, codes & 0x7F] * absmax[group]
    return torch.where(codes >= 0x80, -mag, mag)


# ---------------------------------------------------------------------------------------------
# de8: dynamic 8-bit code with block absmax


def de8_encode_ref(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 `x` as de8 (codes u8[n], absmax f32[B])."""
    n = x.numel()
    g = _grouped(x.float(), DE8_BLOCK)
    absmax = g.abs().amax(dim=1)
    u = torch.where((absmax > 0).unsqueeze(1), g / absmax.unsqueeze(1), 0.0)
    _, mids = dynamic_map(signed)
    codes = torch.bucketize(u, mids).to(torch.uint8)  # count of midpoints below u: the nearest entry
    return codes.reshape(-1)[:n], absmax


def de8_decode_ref(codes: torch.Tensor, absmax: torch.Tensor, numel: int, *, signed: bool) -> torch.Tensor:
    values, _ = dynamic_map(signed)
    block = torch.arange(numel) // DE8_BLOCK
    return values[codes.to(torch.int64)] * absmax[block]


# ---------------------------------------------------------------------------------------------
# log8: fp8's range expansion with the power on the bit pattern
#
# The bits of a positive float, read as an integer, are 2^23 (e + 127 + f) for x = 2^e (1 + f): a
# piecewise-linear log2. So with A = bits(|x|) and M the group's largest A, (M >> 8) - (A >> 8) is
# log2(max/|x|) in units of 2^-15 octave, and fp8's expansion y = 448 (|x|/max)^k is, on the bit
# pattern, a shift, a multiply and an add: no log2 or exp2. A code step is 2/k16 octave (k16 = 16k);
# the code is L - round(k16 ((M >> 8) - (A >> 8)) / 2^16), computed as (k16 (A >> 8) + C) >> 16
# with C = 65536 L + 32767 - k16 (M >> 8) per group (the same integer). L = 127 with a sign bit for
# exp_avg, 255 for exp_avg_sq (never negative: a sign bit would be wasted). A code q decodes to the
# bit pattern M - (L - q) S, S = 2^24 / k16 rounded: the centre of its step. k16 per group is the
# largest that keeps the smallest nonzero |x| at code >= 1 (the group's range spread over all
# codes), but at least LOG8_K16_MIN: below that exp_avg flushes its smallest values to 0 (a zero
# step: harmless), exp_avg_sq keeps them at code 1 (never 0, which would make m / (sqrt(v) + eps)
# into m / eps). NaN keeps its bits as |x| (the largest pattern): a group holding one decodes it.
#
# LOG8_K16_MIN from benchmarks/codec_error.py (error of m/(sqrt(v)+eps) with exp_avg alone coded,
# median of steps 50 and 100): k16 >= 16: 1.54%, 24: 1.47%, 32: 1.27%, 40: 1.25% (1.37% at step 50),
# 48: 1.95%; exp_avg_sq alone: 0.16% at 16 and at 24.

LOG8_K16_MIN = {True: 32, False: 16}  # signed (exp_avg), unsigned (exp_avg_sq)


def _log8_levels(signed: bool) -> int:
    return 127 if signed else 255


def log8_group_params_ref(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (M = bits of max |x|, k16) of flat fp32 `x`, as int64 [G]."""
    A = _u32(_grouped(x.float().contiguous(), LOG8_GROUP)) & 0x7FFFFFFF
    M = A.amax(dim=1)
    Mn = torch.where(A > 0, A, torch.full_like(A, 1 << 40)).amin(dim=1)
    td = (M >> 8) - (Mn >> 8)
    k16 = torch.where(td == 0, 255, (_log8_levels(signed) * 65536 - 32769) // td.clamp(min=1))
    k16 = k16.clamp(LOG8_K16_MIN[signed], 255)
    return M, torch.where(M == 0, 16, k16)


def log8_encode_ref(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat fp32 `x` as log8 (codes u8[n], absmax f32[G], k16 u8[G])."""
    n = x.numel()
    M, k16 = log8_group_params_ref(x, signed=signed)
    g = _u32(_grouped(x.float().contiguous(), LOG8_GROUP))
    A = g & 0x7FFFFFFF
    C = _log8_levels(signed) * 65536 + 32767 - k16 * (M >> 8)
    q = (k16.unsqueeze(1) * (A >> 8) + C.unsqueeze(1)) >> 16  # floor division, as the kernel's arithmetic shift
    q = torch.where(A == 0, 0, q.clamp(min=0 if signed else 1))
    if signed:
        q = torch.where((g >= 2**31) & (q != 0), q | 0x80, q)  # the sign bit, never on a zero code
    return q.reshape(-1)[:n].to(torch.uint8), f32_from_bits(M), k16.to(torch.uint8)


def log8_step(k16: torch.Tensor) -> torch.Tensor:
    """S = 2^24 / k16 rounded: a code step on the bit pattern."""
    return ((1 << 24) + k16 // 2) // k16


def log8_decode_ref(codes: torch.Tensor, absmax: torch.Tensor, k16: torch.Tensor, numel: int, *, signed: bool) -> torch.Tensor:
    c = codes.to(torch.int64)
    group = torch.arange(numel) // LOG8_GROUP
    M = _u32(absmax.contiguous())[group]
    step = log8_step(k16.to(torch.int64).clamp(min=16))[group]  # the encoder writes >= 16; a damaged byte must not overflow
    q = c & 0x7F if signed else c
    A = torch.where(q == 0, 0, (M - (_log8_levels(signed) - q) * step).clamp(min=0))
    if signed:
        A = A | ((c & 0x80) << 24)
    return f32_from_bits(A)


# ---------------------------------------------------------------------------------------------
# bf16+rem: the exact fp32 bits as a rounded bf16 high half and a signed 16-bit remainder


def _u32(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def f32_from_bits(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns (int64) as the fp32 values they are the bits of."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32).view(torch.float32)


def bf16_rem_split_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 `x` as (hi bf16[n], lo int16[n])."""
    u = _u32(x.float().contiguous())
    lo = u & 0xFFFF
    lo = torch.where(lo >= 0x8000, lo - 0x10000, lo)  # signed remainder: hi is rounded to nearest
    hi = ((u - lo) >> 16) & 0xFFFF
    hi = torch.where(hi >= 0x8000, hi - 0x10000, hi)
    return hi.to(torch.int16).view(torch.bfloat16), lo.to(torch.int16)


def bf16_rem_join_ref(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The exact fp32 values back from (hi, lo)."""
    hi = hi.view(torch.int16).to(torch.int64) & 0xFFFF
    return f32_from_bits(((hi << 16) + lo.to(torch.int64)) & 0xFFFFFFFF)
