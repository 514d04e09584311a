"""Read tensors from .safetensors files one at a time with plain reads (no mmap).

A memory map would leave every touched page of a multi-GB shard counted in the process's resident
set; reading each tensor into its own buffer keeps import memory at one block, and
POSIX_FADV_DONTNEED drops the pages from the cache once read. Format: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, List

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit


class SafetensorsError(ValueError):
    pass


def read_header(path: str) -> tuple:
    """(header dict without __metadata__, offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header of {n} bytes is implausible")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SafetensorsError(f"{path}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    size = os.path.getsize(path) - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed or unsupported entry") from None
        if not (0 <= begin <= end <= size) or end - begin != numel * torch.empty((), dtype=dtype).element_size():
            raise SafetensorsError(f"{path}: tensor {name!r} lies outside the file or has the wrong size")
    return header, 8 + n


def read_tensors(path: str, names: List[str], header: Dict, data_offset: int) -> Dict[str, torch.Tensor]:
    """Read the named tensors (original dtype) with pread; drop their pages from the cache after."""
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            done = 0
            while done < end - begin:
                got = os.preadv(fd, [view[done:]], data_offset + begin + done)
                if got == 0:
                    raise SafetensorsError(f"{path}: file ends inside tensor {name!r}")
                done += got
            out[name] = buf.view(DTYPES[info["dtype"]]).view([int(s) for s in info["shape"]])
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, data_offset + begin, end - begin, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out
