"""The checksums of the store's files, by the name the manifest gives (`"checksum"`).

    crc32c  CRC-32C (Castagnoli) on the CPU's CRC32 instructions (fuyou._io, csrc/io/crc32c.cpp):
            ~25 GB/s per core in cache, the core's read rate from DRAM; what new stores use.
    crc32   CRC-32 of zlib (~4 GB/s per core): the checksum of stores whose manifest names none.

Both continue a running value (`start`) the way zlib.crc32 does, so a file read in pieces is
checksummed piece by piece as the pieces arrive.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional

import torch

CRC32C, CRC32 = "crc32c", "crc32"
CHECKSUMS = (CRC32C, CRC32)
LEGACY = CRC32  # a manifest without a "checksum" entry

try:  # the C++ engine's CRC-32C; without the extension, google-crc32c if installed
    from fuyou import _io as _ext
except ImportError:  # pragma: no cover - exercised when the build failed
    _ext = None
try:
    import google_crc32c as _google
except ImportError:
    _google = None


def _bytes(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The first nbytes of a contiguous CPU tensor of any dtype (a gradient is fp32), as uint8."""
    b = buf if buf.dtype == torch.uint8 else buf.reshape(-1).view(torch.uint8)
    if nbytes > b.numel():
        raise ValueError(f"checksum of {nbytes} bytes asked of a {b.numel()}-byte buffer")
    return b[:nbytes]


def _crc32(buf: torch.Tensor, nbytes: int, start: int) -> int:
    return zlib.crc32(memoryview(_bytes(buf, nbytes).numpy()), start)  # zlib releases the GIL on large buffers


def _crc32c_engine(buf: torch.Tensor, nbytes: int, start: int) -> int:
    return _ext.crc32c(_bytes(buf, nbytes).data_ptr(), nbytes, start)


def _crc32c_google(buf: torch.Tensor, nbytes: int, start: int) -> int:
    return _google.extend(start, memoryview(_bytes(buf, nbytes).numpy()))


def _impl(name: str) -> Optional[Callable[[torch.Tensor, int, int], int]]:
    if name == CRC32:
        return _crc32
    if name == CRC32C:
        if _ext is not None and hasattr(_ext, "crc32c"):
            return _crc32c_engine
        return _crc32c_google if _google is not None else None
    return None


def available(name: str) -> bool:
    return _impl(name) is not None


def default_checksum() -> str:
    """What a new store uses: CRC-32C wherever this fuyou can compute it, else zlib's CRC-32."""
    return CRC32C if available(CRC32C) else CRC32


def checksum_fn(name: str) -> Callable[[torch.Tensor, int, int], int]:
    """fn(buf, nbytes, start) -> the checksum `name` of the first nbytes of a contiguous CPU tensor,
    continuing `start`. Raises ValueError for a name this fuyou cannot compute (the message says how)."""
    fn = _impl(name)
    if fn is None:
        if name in CHECKSUMS:
            raise ValueError(f"checksum {name!r} needs fuyou's C++ I/O engine (python setup.py build_ext --inplace) or the "
                             "google-crc32c package")
        raise ValueError(f"checksum {name!r} unknown; this fuyou knows {', '.join(CHECKSUMS)}")
    return fn


