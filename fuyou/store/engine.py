"""The C++ direct-I/O engine (fuyou._io) as DirectFile backends "uring" and "threads".

"uring" (io_uring through liburing) registers only when a ring can be set up here; "threads" (a
pool of pread/pwrite) whenever the extension is built. Without the extension, fuyou says so once
and "auto" falls to the pure-Python backend.

Also `measure_disk`, the read/write rate of a file system through the best backend (used by the
I/O benchmark and by `fuyou probe`).
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from .backends import io_error, register_backend

log = logging.getLogger(__name__)

try:
    from fuyou import _io
except ImportError as _exc:  # not built: pure-Python backend only
    _io = None
    log.warning("fuyou._io is not built (%s); using the pure-Python I/O backend. "
                "Build it with `python setup.py build_ext --inplace` (liburing-dev for io_uring).", _exc)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Shape of the engine's traffic."""

    # 8 x 8 MiB: the best read median of a 1 GiB O_DIRECT sweep on the dev machine (virtio disk,
    # 2026-11-26; 3 runs, round robin): uring 2.14 GB/s, threads 1.94 vs 1.84/1.81 at 1 MiB x 16,
    # 1.61/1.80 at 4 MiB x 8 (fio's best median 1.63). Writes 4.9-5.1 GB/s, also the best point.
    queue_depth: int = 8
    """Chunks in flight together (io_uring submissions, or pread/pwrite threads)."""
    chunk_bytes: int = 8 << 20
    """A request is cut into chunks of this many bytes (multiple of 4096, at most 1 GiB)."""

    def __post_init__(self):
        if not 1 <= self.queue_depth <= 4096:
            raise ValueError(f"queue_depth={self.queue_depth} must be in 1..4096")
        if self.chunk_bytes <= 0 or self.chunk_bytes % 4096 or self.chunk_bytes > 1 << 30:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} must be a positive multiple of 4096, at most 1 GiB")


_FIXED_MAX_BYTES = 1 << 30  # io_uring's limit on one registered buffer


class _EngineFuture:
    """Completion of one engine request; result() waits with the GIL released."""

    __slots__ = ("_handle", "_op", "_path", "_offset", "_nbytes", "_result")

    def __init__(self, handle, op: str, path: str, offset: int, nbytes: int):
        self._handle = handle
        self._op = op
        self._path = path
        self._offset = offset
        self._nbytes = nbytes
        self._result: Optional[int] = None

    def done(self) -> bool:
        return self._result is not None or self._handle.done()

    def result(self) -> int:
        if self._result is None:
            done_bytes, err, err_offset, short_end = self._handle.wait()
            if err:
                detail = f"short {self._op}: file ends before {short_end} bytes" if short_end else ""
                raise io_error(err, self._op, self._path, err_offset, detail)
            if done_bytes != self._nbytes:  # the engine finishes or fails every chunk; never less
                raise io_error(errno.EIO, self._op, self._path, self._offset, f"{done_bytes} of {self._nbytes} bytes done")
            self._result = done_bytes
        return self._result


class EngineBackend:
    """A DirectFile backend over one fuyou._io.Engine ("uring" or "threads")."""

    def __init__(self, kind: str, config: Optional[EngineConfig] = None):
        if _io is None:
            raise RuntimeError("fuyou._io is not built; run `python setup.py build_ext --inplace`")
        self.config = config or EngineConfig()
        # RuntimeError here (e.g. io_uring_queue_init refused) tells the registry it cannot run.
        self._kind = kind
        self._engine = _io.Engine(kind, self.config.queue_depth, self.config.chunk_bytes)
        self._pid = os.getpid()
        self.name = self._engine.name

    def submit(self, op: str, fd: int, ptr: int, nbytes: int, offset: int, path: str) -> _EngineFuture:
        if self._pid != os.getpid():
            self._after_fork()
        return _EngineFuture(self._engine.submit(op, fd, ptr, nbytes, offset), op, path, offset, nbytes)

    def _after_fork(self) -> None:
        # A forked child has the engine object but not its worker threads: start a new engine, and
        # never destroy the inherited one (its destructor would wait for threads that do not exist).
        self._engine.abandon()
        self._engine = _io.Engine(self._kind, self.config.queue_depth, self.config.chunk_bytes)
        self._pid = os.getpid()

    def set_fault(self, nth: int, err: int = 0, short_bytes: int = 0) -> None:
        """Test hook: the `nth` chunk transfer from now fails with errno `err`, or moves only
        `short_bytes` (the engine must then finish the rest); nth=0 clears it."""
        self._engine.set_fault(nth, err, short_bytes)

    @property
    def fixed_transfers(self) -> int:
        """Transfers issued on registered buffers so far (0 unless register_buffers took)."""
        return self._engine.fixed_transfers

    def register_buffers(self, buffers) -> bool:
        """Pin long-lived buffers (tensors or (address, size) pairs) as io_uring fixed buffers; a
        chunk inside one skips per-I/O page pinning. Call with no I/O in flight; [] clears.

        The kernel takes at most 1 GiB per fixed buffer, so larger ones are registered in 1 GiB
        pieces (a chunk that straddles two pieces goes the ordinary way). False where refused
        (no io_uring, or RLIMIT_MEMLOCK too small): I/O then works as before.
        """
        pairs = []
        for b in buffers:
            ptr, size = (b.data_ptr(), b.numel() * b.element_size()) if hasattr(b, "data_ptr") else tuple(b)
            for start in range(0, size, _FIXED_MAX_BYTES):
                pairs.append((ptr + start, min(_FIXED_MAX_BYTES, size - start)))
        return self._engine.register_buffers(pairs)


def uring_works() -> bool:
    """True when this build has io_uring and the kernel lets us set up a ring."""
    if _io is None or not _io.uring_compiled():
        return False
    try:
        _io.Engine("uring", 1, 4096)
    except RuntimeError:
        return False
    return True


if _io is not None:
    register_backend("threads", lambda: EngineBackend("threads"))
    if uring_works():
        register_backend("uring", lambda: EngineBackend("uring"))
    else:
        log.info("io_uring unavailable here; the I/O engine uses its thread pool")


def measure_disk(path: str, *, size_bytes: int = 1 << 30, request_bytes: int = 4 << 20, queue_depth: int = 8,
                 runs: int = 3, backend=None, keep_file: bool = False) -> dict:
    """Sequential O_DIRECT write then read rate of the file system holding `path` (a file to create).

    Writes `size_bytes` (fsync included), reads it back, `runs` times; returns medians in GB/s
    (1e9 bytes/s) with the backend and the shape used. The file is removed unless `keep_file`.
    """
    import statistics

    from .backends import get_backend
    from .directio import DirectFile, aligned_bytes, aligned_empty

    size_bytes = aligned_bytes(size_bytes)
    if isinstance(backend, str) or backend is None:
        name = backend or ("uring" if uring_works() else "threads" if _io is not None else "python")
        if name in ("uring", "threads"):
            backend = EngineBackend(name, EngineConfig(queue_depth=queue_depth, chunk_bytes=request_bytes))
        else:
            backend = get_backend(name)
    buf = aligned_empty(size_bytes)
    buf.fill_(0x5A)  # touch every page before timing
    reads, writes = [], []
    try:
        for _ in range(runs):
            with DirectFile(path, "w", backend=backend) as f:
                t0 = time.perf_counter()
                f.pwrite(buf).get()
                f.fsync()
                writes.append(size_bytes / (time.perf_counter() - t0) / 1e9)
            with DirectFile(path, "r", backend=backend) as f:
                t0 = time.perf_counter()
                f.pread(buf).get()
                reads.append(size_bytes / (time.perf_counter() - t0) / 1e9)
    finally:
        if not keep_file and os.path.exists(path):
            os.remove(path)
    return {
        "backend": backend.name,
        "read_gbps": statistics.median(reads),
        "write_gbps": statistics.median(writes),
        "read_runs_gbps": reads,
        "write_runs_gbps": writes,
        "size_bytes": size_bytes,
        "request_bytes": request_bytes,
        "queue_depth": queue_depth,
    }
