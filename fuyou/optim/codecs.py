"""The stored formats of training state: one `Codec` object per format, in registries by name.

A parameter's state holds three sorts of values (`Codec.serves`): the compute `weights` streamed to
the device, the exact `master` the optimizer updates, and the two AdamW moments (`moment`). A Codec
is one format of one sort: its parts (`layout`), its plain-torch `encode_` / `decode` (the
references the fused C++ kernel reproduces; the math is in codec_ref.py), the id the kernel knows
it by, its group size and its bytes per element.

Which codec stores a tensor is decided here and only here, by name, size and shape:

    moment_codec(name, numel)           # fp32 | bf16 | fp8 | de8 | log8
    master_codec(name, numel)           # fp32 | bf16+rem
    weights_codec(name, numel, shape)   # fp32 | bf16 | fp8

Tensors under SMALL_NUMEL elements (norms, biases) keep fp32 master and moments whatever the name:
they are a sliver of the state, so compressing them saves nothing worth their precision. fp8
weights are 128x128-tile E4M3 for 2-D parameters of at least SMALL_NUMEL elements; the others keep
bf16.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..store.layout import PartSpec
from .codec_ref import (
    DE8_BLOCK,
    FP8_GROUP,
    LOG8_GROUP,
    bf16_rem_join_ref,
    bf16_rem_split_ref,
    de8_decode_ref,
    de8_encode_ref,
    fp8_decode_ref,
    fp8_encode_ref,
    log8_decode_ref,
    log8_encode_ref,
)
from . import native

SMALL_NUMEL = 4096
# The tile of fp8 weights: fuyou.kernels' blockwise-FP8 GEMM format (kernels.reference.FP8_GROUP).
FP8_TILE = 128

Parts = Dict[str, torch.Tensor]
Shape = Optional[Sequence[int]]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, kw_only=True)
class Codec(ABC):
    """One stored format of one sort of state ("weights", "master" or "moment")."""

    name: str
    serves: str
    kernel_id: Optional[int]  # the id csrc/adam/adam.h gives it; None: the fused kernel cannot write it
    group: int = 0  # elements per scale (a full tile for tiled weights); 0: no scales

    @abstractmethod
    def layout(self, numel: int, shape: Shape = None) -> List[PartSpec]:
        """The flat parts a tensor of `numel` elements (of `shape`, where the format needs it) is stored as.

        The order is the fused kernel's argument order."""

    @abstractmethod
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        """Store flat fp32 `x` into `parts` (laid out by `layout`). `signed`: x may be negative (de8
        then takes its signed map; exp_avg_sq is never negative); `shape`: the parameter's."""

    @abstractmethod
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        """The stored values as a new flat fp32 tensor."""

    def values(self, parts: Parts, numel: int) -> torch.Tensor:
        """The stored values as one flat tensor to read: decoded fp32 (a plain format gives its
        part itself, without a copy)."""
        return self.decode(parts, numel)

    def values_bytes(self, numel: int) -> int:
        """Bytes of what `values` returns for `numel` elements (what a copy of them moves)."""
        return 4 * numel

    def bytes_per_element(self, numel: int, shape: Shape = None) -> float:
        """Stored bytes per element of a tensor of `numel` elements, scales included."""
        return sum(p.nbytes for p in self.layout(numel, shape)) / numel


@dataclass(frozen=True, kw_only=True)
class PlainCodec(Codec):
    """One value per element in `dtype` (rounded to nearest even on the way down)."""

    dtype: torch.dtype

    def layout(self, numel: int, shape: Shape = None) -> List[PartSpec]:
        return [PartSpec("value", numel, self.dtype)]

    @torch.no_grad()
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        parts["value"].copy_(x)

    @torch.no_grad()
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        return parts["value"].float().clone()

    def values(self, parts: Parts, numel: int) -> torch.Tensor:
        return parts["value"]

    def values_bytes(self, numel: int) -> int:
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True, kw_only=True)
class Fp8DreCodec(Codec):
    """E4M3 codes with dynamic range expansion (COAT), an absmax and a 16*k per group."""

    def layout(self, numel: int, shape: Shape = None) -> List[PartSpec]:
        groups = _ceil_div(numel, self.group)
        return [PartSpec("codes", numel, torch.uint8), PartSpec("absmax", groups, torch.float32), PartSpec("k16", groups, torch.uint8)]

    @torch.no_grad()
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        codes, absmax, k16 = fp8_encode_ref(x)
        parts["codes"].copy_(codes)
        parts["absmax"].copy_(absmax)
        parts["k16"].copy_(k16)

    @torch.no_grad()
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        return fp8_decode_ref(parts["codes"], parts["absmax"], parts["k16"], numel)


@dataclass(frozen=True, kw_only=True)
class Log8Codec(Fp8DreCodec):
    """fp8's range expansion on the floats' bit patterns: an 8-bit log code, an absmax and a k16 per
    group (the parts of fp8; signed codes for exp_avg, 255 levels for exp_avg_sq)."""

    @torch.no_grad()
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        codes, absmax, k16 = log8_encode_ref(x, signed=signed)
        parts["codes"].copy_(codes)
        parts["absmax"].copy_(absmax)
        parts["k16"].copy_(k16)

    @torch.no_grad()
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        return log8_decode_ref(parts["codes"], parts["absmax"], parts["k16"], numel, signed=signed)


@dataclass(frozen=True, kw_only=True)
class De8Codec(Codec):
    """The 8-bit dynamic code (signed or unsigned map) with an fp32 absmax per block."""

    def layout(self, numel: int, shape: Shape = None) -> List[PartSpec]:
        return [PartSpec("codes", numel, torch.uint8), PartSpec("absmax", _ceil_div(numel, self.group), torch.float32)]

    @torch.no_grad()
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        codes, absmax = de8_encode_ref(x, signed=signed)
        parts["codes"].copy_(codes)
        parts["absmax"].copy_(absmax)

    @torch.no_grad()
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        return de8_decode_ref(parts["codes"], parts["absmax"], numel, signed=signed)


@dataclass(frozen=True, kw_only=True)
class Bf16RemCodec(Codec):
    """The exact fp32 bits as a bf16 high half (a usable bf16 weight) and an int16 remainder."""

    def layout(self, numel: int, shape: Shape = None) -> List[PartSpec]:
        return [PartSpec("hi", numel, torch.bfloat16), PartSpec("lo", numel, torch.int16)]

    @torch.no_grad()
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        hi, lo = bf16_rem_split_ref(x)
        parts["hi"].copy_(hi)
        parts["lo"].copy_(lo)

    @torch.no_grad()
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        return bf16_rem_join_ref(parts["hi"], parts["lo"])


@dataclass(frozen=True, kw_only=True)
class Fp8TileCodec(Codec):
    """E4M3 codes of a 2-D weight [N, K] with an fp32 scale per 128x128 tile (edge tiles partial);
    a "dims" part records [N, K] so that the file alone can be decoded."""

    def layout(self, numel: int, shape: Shape = None) -> List[PartSpec]:
        n, k = _matrix(shape)
        tiles = _ceil_div(n, FP8_TILE) * _ceil_div(k, FP8_TILE)
        return [PartSpec("codes", numel, torch.uint8), PartSpec("scales", tiles, torch.float32), PartSpec("dims", 2, torch.int64)]

    # Both directions give the reference's bits (kernels.reference.weight_quant_ref /
    # weight_dequant_ref). The encode, where N and K are whole tiles, runs on the tiles as a
    # [N/128, 128, K/128, 128] view with the scales broadcast (no padded copy, the clamp in place, the
    # codes cast straight into their part): 2.5-3x the reference's rate. The decode runs on the C++
    # core where it is built (_fp8_tiles_native), else it is the reference.
    @torch.no_grad()
    def encode_(self, x: torch.Tensor, parts: Parts, *, signed: bool = True, shape: Shape = None) -> None:
        from ..kernels.reference import FP8_DTYPE, FP8_MAX, fp8_scale_ref, quantize_weight_fp8

        n, k = _matrix(shape)
        parts["dims"].copy_(torch.tensor([n, k], dtype=torch.int64))
        if n % FP8_TILE or k % FP8_TILE or x.dtype != torch.float32:
            codes, scales = quantize_weight_fp8(x.reshape(n, k))
            parts["codes"].copy_(codes.view(torch.uint8).reshape(-1))
            parts["scales"].copy_(scales.reshape(-1))
            return
        tiles = x.reshape(n // FP8_TILE, FP8_TILE, k // FP8_TILE, FP8_TILE)
        scales = fp8_scale_ref(tiles.abs().amax(dim=(1, 3)))
        q = (tiles / scales[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)  # clamped before the cast, which does not saturate
        parts["codes"].view(FP8_DTYPE).view(tiles.shape).copy_(q)
        parts["scales"].copy_(scales.reshape(-1))

    @torch.no_grad()
    def decode(self, parts: Parts, numel: int, *, signed: bool = True) -> torch.Tensor:
        from ..kernels.reference import dequantize_weight_fp8

        n, k = (int(d) for d in parts["dims"])
        values = _fp8_tiles_native(parts["codes"], parts["scales"], n, k)
        if values is not None:
            return values
        scales = parts["scales"].view(_ceil_div(n, FP8_TILE), _ceil_div(k, FP8_TILE))
        return dequantize_weight_fp8(parts["codes"], scales, (n, k)).reshape(-1)


_FP8_VALUES: Optional[torch.Tensor] = None


def _fp8_tiles_native(codes: torch.Tensor, scales: torch.Tensor, n: int, k: int) -> Optional[torch.Tensor]:
    """fp32 [n * k] values of fp8 weight tiles on fuyou._adam (GIL released; ~5x torch's fp8 -> fp32
    cast here), or None where it is not built: table[code] * the tile's scale, with table torch's own
    conversion of every code, so the bits of kernels.reference.weight_dequant_ref."""
    global _FP8_VALUES
    if native.ext is None:
        return None
    tiles = _ceil_div(n, FP8_TILE) * _ceil_div(k, FP8_TILE)
    if (codes.numel() != n * k or scales.numel() != tiles or codes.dtype != torch.uint8 or scales.dtype != torch.float32
            or not (codes.is_contiguous() and scales.is_contiguous())):
        return None
    if _FP8_VALUES is None:
        _FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    out = torch.empty(n * k, dtype=torch.float32)
    native.ext.fp8_tiles_decode(codes.data_ptr(), scales.data_ptr(), n, k, _FP8_VALUES.data_ptr(), out.data_ptr())
    return out


def _matrix(shape: Shape) -> tuple[int, int]:
    if shape is None or len(shape) != 2:
        raise ValueError(f"fp8 weights are tiles of a 2-D parameter, got shape {None if shape is None else tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _registry(*codecs: Codec) -> Dict[str, Codec]:
    return {c.name: c for c in codecs}


# The kernel ids are csrc/adam/adam.h's enums; the moment groups are the kernel's built-in ones.
WEIGHTS_REGISTRY = _registry(
    PlainCodec(name="fp32", serves="weights", kernel_id=0, dtype=torch.float32),
    PlainCodec(name="bf16", serves="weights", kernel_id=1, dtype=torch.bfloat16),
    Fp8TileCodec(name="fp8", serves="weights", kernel_id=None, group=FP8_TILE * FP8_TILE),
)
MASTER_REGISTRY = _registry(
    PlainCodec(name="fp32", serves="master", kernel_id=0, dtype=torch.float32),
    Bf16RemCodec(name="bf16+rem", serves="master", kernel_id=1),
)
MOMENT_REGISTRY = _registry(
    PlainCodec(name="fp32", serves="moment", kernel_id=0, dtype=torch.float32),
    PlainCodec(name="bf16", serves="moment", kernel_id=1, dtype=torch.bfloat16),
    Fp8DreCodec(name="fp8", serves="moment", kernel_id=2, group=FP8_GROUP),
    De8Codec(name="de8", serves="moment", kernel_id=3, group=DE8_BLOCK),
    Log8Codec(name="log8", serves="moment", kernel_id=4, group=LOG8_GROUP),
)
# The names a StateConfig accepts for its master and moments.
MASTER_CODECS = tuple(MASTER_REGISTRY)
STATE_CODECS = tuple(MOMENT_REGISTRY)


def _lookup(registry: Dict[str, Codec], what: str, name: str) -> Codec:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"{what} codec {name!r} unknown; choose one of {', '.join(registry)}") from None


def _small_keeps_fp32(registry: Dict[str, Codec], what: str, name: str, numel: int) -> Codec:
    codec = _lookup(registry, what, name)
    return registry["fp32"] if numel < SMALL_NUMEL else codec


def moment_codec(name: str, numel: int) -> Codec:
    """The codec that stores an AdamW moment of `numel` elements under the name `name`."""
    return _small_keeps_fp32(MOMENT_REGISTRY, "optimizer-state", name, numel)


def master_codec(name: str, numel: int) -> Codec:
    """The codec that stores a master weight of `numel` elements under the name `name`."""
    return _small_keeps_fp32(MASTER_REGISTRY, "master", name, numel)


def weights_codec(name: str, numel: int, shape: Shape = None) -> Codec:
    """The codec that stores the compute weights of a parameter of `numel` elements and `shape`
    under the name `name` (fp8 tiles only 2-D parameters of >= SMALL_NUMEL elements; others bf16)."""
    codec = _lookup(WEIGHTS_REGISTRY, "weights", name)
    tiled = shape is not None and len(shape) == 2 and numel >= SMALL_NUMEL
    return WEIGHTS_REGISTRY["bf16"] if isinstance(codec, Fp8TileCodec) and not tiled else codec


@dataclass(frozen=True)
class ParamCodecs:
    """The codecs of one parameter's state, resolved once."""

    weights: Codec
    master: Codec
    moments: Codec  # exp_avg and exp_avg_sq
