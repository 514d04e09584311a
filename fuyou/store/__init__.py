"""The SSD tier: direct I/O (DirectFile/IOFuture), backends, and the block store."""
from .backends import available_backends, get_backend, register_backend, set_default_backend
from .directio import ALIGN, DirectFile, IOFuture, aligned_bytes, aligned_empty, set_fault_hook

__all__ = [
    "ALIGN",
    "DirectFile",
    "IOFuture",
    "aligned_bytes",
    "aligned_empty",
    "set_fault_hook",
    "available_backends",
    "get_backend",
    "register_backend",
    "set_default_backend",
]
