"""GPUDirect Storage through kvikio: SSD <-> device memory without a CPU bounce.

`read_into_device(path, tensor, file_offset)` / `write_from_device(...)` move a contiguous tensor's
bytes; `submit_device(...)` is the non-blocking form (a future with get()/done()). A CUDA tensor
goes through kvikio.CuFile (GDS, or kvikio's compat mode) when kvikio works here, otherwise through
an aligned pinned host buffer and a copy; a CPU tensor goes through DirectFile. So the runtime can
call one function for any buffer.

Backend "kvikio" (DirectFile traffic on host memory through kvikio's thread pool) registers only
when `import kvikio` works and a probe read succeeds: kvikio cannot do any I/O without libcuda, so
on a CPU-only machine it stays unregistered and `kvikio_status()` says why.
"""
from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from typing import Optional

import torch

from .backends import io_error, register_backend
from .directio import ALIGN, DirectFile, aligned_bytes, aligned_empty

try:
    import kvikio
except Exception as _exc:  # noqa: BLE001 - ImportError, or a CUDA library failing to load
    kvikio = None
    _import_error = f"kvikio not importable ({type(_exc).__name__}: {_exc}); install the 'gds' extra"
else:
    _import_error = ""

_status: Optional[tuple[bool, str]] = None


def kvikio_status() -> tuple[bool, str]:
    """(usable, reason): whether kvikio can move bytes here, probed once with a 4 KiB file."""
    global _status
    if _status is None:
        _status = _probe()
    return _status


def _probe() -> tuple[bool, str]:
    if kvikio is None:
        return False, _import_error
    pattern = bytes(range(256)) * (ALIGN // 256)
    with tempfile.TemporaryDirectory(prefix="fuyou-kvikio-") as tmp:
        path = os.path.join(tmp, "probe")
        with open(path, "wb") as f:
            f.write(pattern)
        try:
            if torch.cuda.is_available():
                buf = torch.empty(ALIGN, dtype=torch.uint8, device="cuda")
            else:
                buf = _host_array(aligned_empty(ALIGN))
            with kvikio.CuFile(path, "r") as f:
                got = f.pread(buf, ALIGN, 0).get()
            data = bytes(buf.cpu().numpy()) if isinstance(buf, torch.Tensor) else bytes(buf)
        except Exception as exc:  # noqa: BLE001 - kvikio raises RuntimeError without libcuda
            return False, f"kvikio cannot do I/O here ({type(exc).__name__}: {exc})"
    if got != ALIGN or data != pattern:
        return False, f"kvikio probe read returned {got} bytes or wrong data"
    return True, "kvikio works" + ("" if torch.cuda.is_available() else " (host memory only)")


def _host_array(tensor: torch.Tensor):
    """A writable numpy view of a contiguous CPU tensor's bytes (kvikio takes host arrays)."""
    return _host_array_from(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def _host_array_from(ptr: int, nbytes: int):
    import numpy as np

    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (any shape, 0-d included)."""
    return tensor.reshape(-1).view(torch.uint8)


def _check(tensor: torch.Tensor, nbytes: Optional[int], file_offset: int) -> int:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
        raise ValueError("device I/O needs a contiguous torch.Tensor; pass tensor.contiguous()")
    cap = tensor.numel() * tensor.element_size()
    nbytes = cap if nbytes is None else int(nbytes)
    if not 0 <= nbytes <= cap:
        raise ValueError(f"request of {nbytes} bytes does not fit the {cap}-byte tensor")
    if file_offset % ALIGN:
        raise ValueError(f"file offset {file_offset} is not a multiple of {ALIGN}")
    return nbytes


class _Done:
    def __init__(self, n: int):
        self._n = n

    def get(self) -> int:
        return self._n

    def done(self) -> bool:
        return True

    result = get


class _KvikioFuture:
    """A kvikio IOFuture that closes its CuFile and checks the byte count on get()."""

    def __init__(self, cufile, fut, op: str, path: str, offset: int, nbytes: int, keepalive=None):
        self._file, self._fut, self._op, self._path = cufile, fut, op, path
        self._offset, self._nbytes, self._keepalive = offset, nbytes, keepalive
        self._n: Optional[int] = None

    def done(self) -> bool:
        return self._n is not None or self._fut.done()

    def get(self) -> int:
        if self._n is None:
            try:
                n = self._fut.get()
            except Exception as exc:  # noqa: BLE001 - kvikio raises RuntimeError with its reason
                raise io_error(errno.EIO, self._op, self._path, self._offset, str(exc)) from exc
            finally:
                self._file.close()
                self._keepalive = None
            if n != self._nbytes:
                raise io_error(errno.EIO, self._op, self._path, self._offset,
                               f"short {self._op}: {n} of {self._nbytes} bytes")
            self._n = n
        return self._n

    result = get  # DirectFile backends call result()


def _kvikio_submit(op: str, path: str, buf, nbytes: int, offset: int, keepalive=None) -> _KvikioFuture:
    # "r+" keeps the rest of an existing file; "w" (truncating) only creates a missing one.
    mode = "r" if op == "read" else ("r+" if os.path.exists(path) else "w")
    cufile = kvikio.CuFile(path, mode)
    fn = cufile.pread if op == "read" else cufile.pwrite
    return _KvikioFuture(cufile, fn(buf, nbytes, offset), op, path, offset, nbytes, keepalive)


def submit_device(op: str, path: str, tensor: torch.Tensor, file_offset: int = 0, nbytes: Optional[int] = None):
    """Start reading ("read") or writing ("write") `nbytes` (default: all) of `tensor` at `file_offset`.

    Returns a future with get() -> bytes done (raises OSError naming path and offset) and done().
    Writes create a missing file and keep the rest of an existing one; a tail is zero-padded to
    4 KiB on the DirectFile paths.
    """
    if op not in ("read", "write"):
        raise ValueError(f"op must be 'read' or 'write', not {op!r}")
    nbytes = _check(tensor, nbytes, file_offset)
    path = os.fspath(path)
    if nbytes == 0:
        return _Done(0)
    if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGN == 0:  # else through the bounce
        f = DirectFile(path, "r" if op == "read" else "rw")
        fut = (f.pread if op == "read" else f.pwrite)(_byte_view(tensor), nbytes, file_offset)
        return _ClosingFuture(fut, f)
    if tensor.device.type == "cuda" and kvikio_status()[0]:
        return _kvikio_submit(op, path, _byte_view(tensor)[:nbytes], nbytes, file_offset, tensor)
    return _Done(_bounce(op, path, tensor, nbytes, file_offset))


class _ClosingFuture:
    def __init__(self, fut, f: DirectFile):
        self._fut, self._file = fut, f

    def done(self) -> bool:
        return self._fut.done()

    def get(self) -> int:
        try:
            return self._fut.get()
        finally:
            self._file.close()


def _bounce(op: str, path: str, tensor: torch.Tensor, nbytes: int, file_offset: int) -> int:
    """No usable GDS, or an unaligned host tensor: through an aligned host buffer (synchronous)."""
    host = aligned_empty(aligned_bytes(nbytes), pin=tensor.is_cuda)[:nbytes]
    dev = _byte_view(tensor)[:nbytes]
    if op == "read":
        with DirectFile(path, "r") as f:
            f.pread(host, nbytes, file_offset).get()
        dev.copy_(host)
    else:
        host.copy_(dev)
        with DirectFile(path, "rw") as f:
            f.pwrite(host, nbytes, file_offset).get()
    return nbytes


def read_into_device(path: str, tensor: torch.Tensor, file_offset: int = 0, nbytes: Optional[int] = None) -> int:
    """Read `nbytes` (default: the tensor's size) at `file_offset` into `tensor` (CUDA or CPU); blocks."""
    return submit_device("read", path, tensor, file_offset, nbytes).get()


def write_from_device(path: str, tensor: torch.Tensor, file_offset: int = 0, nbytes: Optional[int] = None) -> int:
    """Write `nbytes` (default: the tensor's size) of `tensor` at `file_offset`; blocks."""
    return submit_device("write", path, tensor, file_offset, nbytes).get()


class KvikioBackend:
    """DirectFile backend on kvikio (host buffers; kvikio's own thread pool and O_DIRECT handle)."""

    name = "kvikio"

    def __init__(self):
        ok, why = kvikio_status()
        if not ok:
            raise RuntimeError(why)

    def submit(self, op: str, fd: int, ptr: int, nbytes: int, offset: int, path: str):
        if nbytes == 0:
            return _Done(0)
        buf = _host_array_from(ptr, nbytes)
        return _kvikio_submit(op, path, buf, nbytes, offset)


if kvikio is not None and kvikio_status()[0]:
    register_backend("kvikio", KvikioBackend)
