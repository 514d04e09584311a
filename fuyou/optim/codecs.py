"""Optimizer-state codecs in plain PyTorch: the references the fused C++ kernel must reproduce.

Moments (exp_avg `m`, exp_avg_sq `v`):
  fp32  one fp32 value per element.
  bf16  one bf16 value per element (round to nearest even).
  fp8   E4M3 codes in groups of 128 with dynamic range expansion (COAT): per group
        mx = max|x|, mn = min nonzero |x|, c = sqrt(mx*mn), k = floor(log2(448^2/2)/log2(mx/mn)*16)/16
        clamped to [1, 255/16], x' = sign(x)(|x|/c)^k, s = (mx/c)^k/448, code = e4m3(x'/s).
        The centre cancels (see below): code = e4m3(448 (|x|/mx)^k), x = mx (code/448)^(1/k).
        Parts: codes u8[n] (sign bit + E4M3 magnitude), absmax f32[G] (mx), k16 u8[G] (16*k).
        Decode: x = sign * R[k16][|code|] * mx with R[k16][q] = (e4m3(q)/448)^(1/k), the same fp32
        table the fused kernel uses, so decoding is bit-identical in both.
  de8   8-bit dynamic code (signed map for m, unsigned for v), blocks of 256 with an fp32 absmax;
        a value becomes the index of the nearest map entry of x/absmax. Parts: codes u8[n], absmax f32[B].
Master weights:
  fp32      one fp32 value.
  bf16+rem  the fp32 bits split into a bf16 high half (rounded: it is a usable bf16 weight) and a
            signed 16-bit remainder; hi << 16 + remainder gives back the exact fp32 bits.

Tensors under SMALL_NUMEL elements keep fp32 moments and master whatever the codec.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict

import torch

from ..store.layout import PartSpec

SMALL_NUMEL = 4096
FP8_GROUP = 128
DE8_BLOCK = 256
E4M3_MAX = 448.0
# log2 of the dynamic range E4M3 covers with the centre at 1: log2(448^2 / 2) (COAT).
FP8_LOG_RANGE = math.log2(E4M3_MAX * E4M3_MAX / 2.0)
K16_MIN, K16_MAX = 16, 255  # k in [1, 255/16]: k >= 1 keeps the range; the cap fits a byte

STATE_CODECS = ("fp32", "bf16", "fp8", "de8")
MASTER_CODECS = ("fp32", "bf16+rem")

Parts = Dict[str, torch.Tensor]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def effective_state_codec(codec: str, numel: int) -> str:
    return "fp32" if numel < SMALL_NUMEL else codec


def effective_master_codec(codec: str, numel: int) -> str:
    return "fp32" if numel < SMALL_NUMEL else codec


def moment_layout(codec: str, numel: int) -> list[PartSpec]:
    codec = effective_state_codec(codec, numel)
    if codec == "fp32":
        return [PartSpec("value", numel, torch.float32)]
    if codec == "bf16":
        return [PartSpec("value", numel, torch.bfloat16)]
    if codec == "fp8":
        groups = _ceil_div(numel, FP8_GROUP)
        return [
            PartSpec("codes", numel, torch.uint8),
            PartSpec("absmax", groups, torch.float32),
            PartSpec("k16", groups, torch.uint8),
        ]
    if codec == "de8":
        return [PartSpec("codes", numel, torch.uint8), PartSpec("absmax", _ceil_div(numel, DE8_BLOCK), torch.float32)]
    raise ValueError(f"optimizer-state codec {codec!r} unknown; choose one of {', '.join(STATE_CODECS)}")


def master_layout(codec: str, numel: int) -> list[PartSpec]:
    codec = effective_master_codec(codec, numel)
    if codec == "fp32":
        return [PartSpec("value", numel, torch.float32)]
    if codec == "bf16+rem":
        return [PartSpec("hi", numel, torch.bfloat16), PartSpec("lo", numel, torch.int16)]
    raise ValueError(f"master codec {codec!r} unknown; choose one of {', '.join(MASTER_CODECS)}")


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
    """For each value of the top 16 bits of an fp32 u: the number of map midpoints below every u
    with those bits (u8, 65536 entries + 4 bytes of padding for 32-bit gathers).

    Within [-1, 1] such a bucket (a bf16 step) holds at most one midpoint, so the nearest-entry
    index of u is table[bits >> 16] + (mid[table] < u): the fused kernel's one-probe search, equal
    to the full binary search (checked here when the table is built).
    """
    _, mids = dynamic_map(signed)
    keys = torch.arange(65536, dtype=torch.int64)

    def as_float(bits):
        return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)

    lower, upper = as_float(keys << 16), as_float((keys << 16) | 0xFFFF)
    bmin, bmax = torch.minimum(lower, upper), torch.maximum(lower, upper)
    lo = torch.searchsorted(mids, bmin.contiguous(), side="left")
    inside = torch.searchsorted(mids, bmax.contiguous(), side="right") - lo
    used = torch.isfinite(bmin) & torch.isfinite(bmax) & (bmin >= -1) & (bmax <= 1)
    if int(inside[used].max()) > 1:
        raise RuntimeError("de8 map too dense for one-probe buckets; the fused de8 search needs a finer key")
    table = torch.zeros(65536 + 4, dtype=torch.uint8)
    table[:65536] = lo.clamp(max=255).to(torch.uint8)
    return table


@lru_cache(maxsize=None)
def de8_padded_mids(signed: bool) -> torch.Tensor:
    """The 255 midpoints followed by two +inf (so a probe at index 255 or 256 never counts)."""
    _, mids = dynamic_map(signed)
    return torch.cat([mids, torch.full((2,), math.inf)]).contiguous()


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


def fp8_encode_ref(x: torch.Tensor, parts: Parts) -> None:
    """Encode flat fp32 `x` into fp8 parts (codes, absmax, k16)."""
    n = x.numel()
    mx, k16 = fp8_group_params_ref(x)
    g = _grouped(x.float(), FP8_GROUP).double()
    k = (k16.double() / 16.0).unsqueeze(1)
    inv = torch.where(mx > 0, 1.0 / mx.double(), 0.0).unsqueeze(1)
    y = (E4M3_MAX * torch.pow(g.abs() * inv, k)).clamp(max=E4M3_MAX)
    codes = y.float().to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(g < 0, codes | 0x80, codes).reshape(-1)[:n]
    parts["codes"].copy_(codes)
    parts["absmax"].copy_(mx)
    parts["k16"].copy_(k16)


def fp8_decode_ref(parts: Parts, numel: int) -> torch.Tensor:
    codes = parts["codes"].to(torch.int64)
    group = torch.arange(numel) // FP8_GROUP
    k16 = parts["k16"].to(torch.int64)[group]
    mag = fp8_root_table()[k16, codes & 0x7F] * parts["absmax"][group]
    return torch.where(codes >= 0x80, -mag, mag)


# ---------------------------------------------------------------------------------------------
# de8: dynamic 8-bit code with block absmax


def de8_encode_ref(x: torch.Tensor, parts: Parts, *, signed: bool) -> None:
    n = x.numel()
    g = _grouped(x.float(), DE8_BLOCK)
    absmax = g.abs().amax(dim=1)
    u = torch.where((absmax > 0).unsqueeze(1), g / absmax.unsqueeze(1), 0.0)
    _, mids = dynamic_map(signed)
    codes = torch.bucketize(u, mids).to(torch.uint8)  # count of midpoints below u: the nearest entry
    parts["codes"].copy_(codes.reshape(-1)[:n])
    parts["absmax"].copy_(absmax)


def de8_decode_ref(parts: Parts, numel: int, *, signed: bool) -> torch.Tensor:
    values, _ = dynamic_map(signed)
    block = torch.arange(numel) // DE8_BLOCK
    return values[parts["codes"].to(torch.int64)] * parts["absmax"][block]


# ---------------------------------------------------------------------------------------------
# Dispatch by codec


def _codec_of_parts(parts: Parts) -> str:
    if "value" in parts:
        return "fp32" if parts["value"].dtype == torch.float32 else "bf16"
    if "k16" in parts:
        return "fp8"
    if "absmax" in parts and "codes" in parts:
        return "de8"
    raise ValueError(f"parts {sorted(parts)} match no optimizer-state codec; build them with state_layout()")


@torch.no_grad()
def encode_moment_(x: torch.Tensor, parts: Parts, *, signed: bool) -> None:
    """Store flat fp32 `x` into the moment's parts (codec read from the parts)."""
    codec = _codec_of_parts(parts)
    if codec in ("fp32", "bf16"):
        parts["value"].copy_(x)
    elif codec == "fp8":
        fp8_encode_ref(x, parts)
    else:
        de8_encode_ref(x, parts, signed=signed)


@torch.no_grad()
def decode_moment(parts: Parts, numel: int, *, signed: bool) -> torch.Tensor:
    """The moment as a new flat fp32 tensor."""
    codec = _codec_of_parts(parts)
    if codec in ("fp32", "bf16"):
        return parts["value"].float().clone()
    if codec == "fp8":
        return fp8_decode_ref(parts, numel)
    return de8_decode_ref(parts, numel, signed=signed)


def _u32(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


@torch.no_grad()
def encode_master_(x: torch.Tensor, parts: Parts) -> None:
    if "value" in parts:
        parts["value"].copy_(x)
        return
    u = _u32(x.float().contiguous())
    lo = u & 0xFFFF
    lo = torch.where(lo >= 0x8000, lo - 0x10000, lo)  # signed remainder: hi is rounded to nearest
    hi = ((u - lo) >> 16) & 0xFFFF
    hi = torch.where(hi >= 0x8000, hi - 0x10000, hi)
    parts["hi"].copy_(hi.to(torch.int16).view(torch.bfloat16))
    parts["lo"].copy_(lo.to(torch.int16))


@torch.no_grad()
def decode_master_ref(parts: Parts) -> torch.Tensor:
    if "value" in parts:
        return parts["value"].float().clone()
    hi = parts["hi"].view(torch.int16).to(torch.int64) & 0xFFFF
    u = ((hi << 16) + parts["lo"].to(torch.int64)) & 0xFFFFFFFF
    u = torch.where(u >= 2**31, u - 2**32, u)
    return u.to(torch.int32).view(torch.float32)
