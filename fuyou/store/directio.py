"""Direct (O_DIRECT) file I/O into caller-owned aligned buffers: `DirectFile` and `IOFuture`.

Every byte the store moves goes through here. A request is split into an aligned body, done by the
selected backend straight into the caller's buffer, and an unaligned tail (< 4 KiB), done through a
small aligned bounce buffer: files are padded to 4 KiB, buffers are exact.

Backends (see backends.py) do raw aligned I/O only: `submit(op, fd, ptr, nbytes, offset, path)`
returns an object with `.result()` (bytes done; raises OSError naming path and offset) and `.done()`.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import warnings
from typing import Callable, Optional

import torch

ALIGN = 4096  # O_DIRECT alignment of address, size and offset (the page size; >= any logical block)


def aligned_bytes(nbytes: int, align: int = ALIGN) -> int:
    """`nbytes` rounded up to a multiple of `align`."""
    return (int(nbytes) + align - 1) // align * align


def aligned_empty(nbytes: int, *, pin: bool = False, align: int = ALIGN) -> torch.Tensor:
    """A uint8 CPU tensor of exactly `nbytes` whose address is `align`-aligned.

    Over-allocates by `align` and slices; the slice keeps the parent storage alive.
    """
    nbytes = int(nbytes)
    raw = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % align
    return raw[shift : shift + nbytes]


def tensor_ptr_nbytes(buf) -> tuple[int, int]:
    """Address and size in bytes of a contiguous CPU tensor."""
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor buffer, got {type(buf).__name__}")
    if not buf.is_contiguous():
        raise ValueError("I/O buffer must be contiguous; pass buf.contiguous() or a pool buffer")
    return buf.data_ptr(), buf.numel() * buf.element_size()


# ---------------------------------------------------------------------------------------------
# Fault injection: tests (and the reliability suite) install a hook that may raise OSError for a
# given request, as a failing disk would. Called before each backend submission.
_fault_hook: Optional[Callable[[str, str, int, int], None]] = None


def set_fault_hook(hook: Optional[Callable[[str, str, int, int], None]]) -> None:
    """Install `hook(op, path, offset, nbytes)` (op is "read" or "write"); None removes it."""
    global _fault_hook
    _fault_hook = hook


class IOFuture:
    """Completion of one DirectFile request: `get()` waits and returns the bytes done."""

    def __init__(self, parts, finish: Optional[Callable[[], None]] = None, keepalive=None):
        self._parts = parts  # backend futures, each .result() -> bytes
        self._finish = finish  # run once after all parts (tail copy-out)
        self._keepalive = keepalive  # buffers that must outlive the I/O
        self._lock = threading.Lock()
        self._result: Optional[int] = None
        self._error: Optional[BaseException] = None

    def done(self) -> bool:
        return self._result is not None or self._error is not None or all(p.done() for p in self._parts)

    def get(self) -> int:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._result is None:
                total = 0
                err = None
                for p in self._parts:  # wait for every part: none may still write into a freed buffer
                    try:
                        total += p.result()
                    except BaseException as exc:  # noqa: BLE001 - the first error is raised below
                        err = err or exc
                try:
                    if err is None and self._finish is not None:
                        self._finish()
                finally:
                    self._keepalive = None
                if err is not None:
                    self._error = err
                    raise err
                self._result = total
            return self._result


_direct_warned = False


def _open_fd(path: str, mode: str) -> tuple[int, bool]:
    """Open with O_DIRECT; fall back to buffered I/O (warn once) where the filesystem refuses it."""
    global _direct_warned
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "rw": os.O_RDWR | os.O_CREAT}[mode]
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | os.O_DIRECT, 0o666), True
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    if not _direct_warned:
        warnings.warn(f"{os.path.dirname(path) or '.'}: filesystem refuses O_DIRECT; using buffered I/O (slower, page cache)")
        _direct_warned = True
    return os.open(path, flags, 0o666), False


class DirectFile:
    """An O_DIRECT file. `with DirectFile(path, "r") as f: f.pread(buf).get()`.

    mode: "r", "w" (create, no truncate) or "rw". `backend` is an IOBackend or a name from
    backends.py (default: the process default, see `backends.set_default_backend`).
    """

    def __init__(self, path: str, mode: str = "r", backend=None):
        from .backends import get_backend

        if mode not in ("r", "w", "rw"):
            raise ValueError(f"DirectFile mode must be 'r', 'w' or 'rw', not {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self.backend = get_backend(backend)
        self.fd, self.direct = _open_fd(self.path, mode)

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fsync(self) -> None:
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # -- requests ------------------------------------------------------------------------------
    def _check(self, buf, size, file_offset) -> tuple[int, int]:
        ptr, cap = tensor_ptr_nbytes(buf)
        size = cap if size is None else int(size)
        if size < 0 or size > cap:
            raise ValueError(f"request of {size} bytes does not fit the {cap}-byte buffer")
        if file_offset % ALIGN:
            raise ValueError(f"file offset {file_offset} is not a multiple of {ALIGN}")
        if size >= ALIGN and ptr % ALIGN and self.direct:
            raise ValueError("buffer address is not 4 KiB aligned; allocate it with fuyou.store.aligned_empty or a memory pool")
        return ptr, size

    def _submit(self, op: str, ptr: int, nbytes: int, offset: int):
        if _fault_hook is not None:
            try:
                _fault_hook(op, self.path, offset, nbytes)
            except OSError as exc:  # reported by get(), like a failing disk, after the other parts
                return _FailedPart(exc)
        return self.backend.submit(op, self.fd, ptr, nbytes, offset, self.path)

    def pread(self, buf: torch.Tensor, size: Optional[int] = None, file_offset: int = 0) -> IOFuture:
        """Read `size` bytes (default: the whole buffer) at `file_offset` into `buf`.

        The file must hold the 4 KiB-padded extent of the request; a short file is an error.
        """
        ptr, size = self._check(buf, size, file_offset)
        body = size // ALIGN * ALIGN
        tail = size - body
        parts = [self._submit("read", ptr, body, file_offset)] if body else []
        bounce = aligned_empty(ALIGN) if tail else None
        if tail:
            parts.append(_TailPart(self._submit("read", bounce.data_ptr(), ALIGN, file_offset + body), tail))

        def copy_tail():
            ctypes.memmove(ptr + body, bounce.data_ptr(), tail)

        return IOFuture(parts, copy_tail if tail else None, keepalive=(buf, bounce))

    def pwrite(self, buf: torch.Tensor, size: Optional[int] = None, file_offset: int = 0) -> IOFuture:
        """Write `size` bytes (default: the whole buffer) at `file_offset`; a tail is zero-padded to 4 KiB."""
        ptr, size = self._check(buf, size, file_offset)
        body = size // ALIGN * ALIGN
        tail = size - body
        parts = [self._submit("write", ptr, body, file_offset)] if body else []
        bounce = None
        if tail:
            bounce = aligned_empty(ALIGN)
            bounce.zero_()
            ctypes.memmove(bounce.data_ptr(), ptr + body, tail)
            parts.append(_TailPart(self._submit("write", bounce.data_ptr(), ALIGN, file_offset + body), tail))
        return IOFuture(parts, None, keepalive=(buf, bounce))


class _FailedPart:
    """A request part refused by the fault hook: its error surfaces from IOFuture.get()."""

    def __init__(self, exc: OSError):
        self._exc = exc

    def result(self) -> int:
        raise self._exc

    def done(self) -> bool:
        return True


class _TailPart:
    """A padded tail request whose useful size is `tail` bytes."""

    def __init__(self, fut, tail: int):
        self._fut = fut
        self._tail = tail

    def result(self) -> int:
        self._fut.result()
        return self._tail

    def done(self) -> bool:
        return self._fut.done()
