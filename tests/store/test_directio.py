"""DirectFile over every backend that runs here: sizes, tails, offsets, concurrency, errors."""
from __future__ import annotations

import errno
import os
import warnings

import pytest
import torch

from fuyou.store import ALIGN, DirectFile, aligned_bytes, aligned_empty, set_fault_hook
from fuyou.store import backends
from fuyou.store.backends import io_error

MiB = 1 << 20
SIZES = [1, 7, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 123, MiB - 1, 3 * MiB + 5, 9 * MiB]
SENTINEL = 0xA5


def _random(nbytes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    buf = aligned_empty(nbytes)
    buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g))
    return buf


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("file_offset", [0, 5 * ALIGN])
def test_roundtrip_exact_buffer_padded_file(tmp_path, backend_name, nbytes, file_offset):
    path = tmp_path / "f.bin"
    src = _random(nbytes, seed=nbytes)
    with DirectFile(path, "w", backend=backend_name) as f:
        assert f.pwrite(src, file_offset=file_offset).get() == nbytes
    # The file holds the 4 KiB-padded extent: the tail's padding is zeros.
    assert os.path.getsize(path) == file_offset + aligned_bytes(nbytes)
    with open(path, "rb") as raw:
        raw.seek(file_offset + nbytes)
        assert set(raw.read()) <= {0}
    # Read into a larger buffer: exactly `nbytes` land, the bytes after stay untouched.
    dst = aligned_empty(nbytes + 100)
    dst.fill_(SENTINEL)
    with DirectFile(path, "r", backend=backend_name) as f:
        fut = f.pread(dst, nbytes, file_offset)
        assert fut.get() == nbytes
        assert fut.done()
    torch.testing.assert_close(dst[:nbytes], src, rtol=0, atol=0)
    assert bool((dst[nbytes:] == SENTINEL).all())


def test_roundtrip_64mib_plus_one(tmp_path, backend_name):
    nbytes = 64 * MiB + 1
    src = _random(nbytes, seed=3)
    dst = aligned_empty(nbytes)
    with DirectFile(tmp_path / "big.bin", "rw", backend=backend_name) as f:
        f.pwrite(src).get()
        assert f.pread(dst).get() == nbytes
    assert torch.equal(dst, src)


def test_64_concurrent_requests(tmp_path, backend_name):
    # Sizes that are not multiples of 4 KiB, each request at its own padded offset.
    sizes = [ALIGN * (1 + i % 7) + (i * 37) % ALIGN for i in range(64)]
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + aligned_bytes(s))
    srcs = [_random(s, seed=i) for i, s in enumerate(sizes)]
    dsts = [aligned_empty(s) for s in sizes]
    with DirectFile(tmp_path / "many.bin", "rw", backend=backend_name) as f:
        writes = [f.pwrite(b, file_offset=o) for b, o in zip(srcs, offsets)]
        assert [w.get() for w in writes] == sizes
        reads = [f.pread(b, file_offset=o) for b, o in zip(dsts, offsets)]
        assert [r.get() for r in reversed(reads)] == sizes[::-1]
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        assert torch.equal(d, s), f"request {i}"


def test_read_after_write_same_handle(tmp_path, backend_name):
    with DirectFile(tmp_path / "raw.bin", "rw", backend=backend_name) as f:
        for step in range(3):  # overwrite in place; each read sees the latest write
            src = _random(2 * MiB + 17, seed=step)
            f.pwrite(src, file_offset=ALIGN).get()
            dst = aligned_empty(src.numel())
            f.pread(dst, file_offset=ALIGN).get()
            assert torch.equal(dst, src)
        f.fsync()
        assert f.size() == ALIGN + aligned_bytes(2 * MiB + 17)


def test_file_shorter_than_read_is_a_clear_error(tmp_path, backend_name):
    path = tmp_path / "short.bin"
    with DirectFile(path, "w", backend=backend_name) as f:
        f.pwrite(_random(2 * ALIGN)).get()
    dst = aligned_empty(64 * ALIGN)
    with DirectFile(path, "r", backend=backend_name) as f:
        fut = f.pread(dst)
        with pytest.raises(OSError) as info:
            fut.get()
    assert info.value.errno == errno.EIO
    msg = str(info.value)
    assert str(path) in msg and "at offset 8192" in msg and "short read" in msg
    with pytest.raises(OSError):  # the error sticks to the future
        fut.get()


def test_python_fault_hook_names_path_and_offset(tmp_path, backend_name):
    path = tmp_path / "fault.bin"
    src = _random(3 * MiB + 10)
    with DirectFile(path, "w", backend=backend_name) as f:
        f.pwrite(src).get()
    bad_offset = 3 * MiB  # the tail request of the read below
    seen = []

    def hook(op, p, offset, nbytes):
        seen.append((op, offset, nbytes))
        if op == "read" and offset == bad_offset:
            raise io_error(errno.EIO, op, p, offset, "injected")

    dst = aligned_empty(src.numel())
    set_fault_hook(hook)
    try:
        with DirectFile(path, "r", backend=backend_name) as f:
            with pytest.raises(OSError) as info:
                f.pread(dst).get()
    finally:
        set_fault_hook(None)
    assert info.value.errno == errno.EIO
    assert str(path) in str(info.value) and f"at offset {bad_offset}" in str(info.value)
    assert seen == [("read", 0, 3 * MiB), ("read", bad_offset, ALIGN)]
    with DirectFile(path, "r", backend=backend_name) as f:  # hook removed: the same read works
        f.pread(dst).get()
    assert torch.equal(dst, src)


def test_enospc_on_a_full_file_system(small_fs, backend_name):
    mnt, kind = small_fs
    path = os.path.join(mnt, f"fill-{backend_name}.bin")
    src = _random(16 * MiB)  # larger than the file system
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tmpfs refuses O_DIRECT: buffered, with a warning
            f = DirectFile(path, "w", backend=backend_name)
        with f:
            with pytest.raises(OSError) as info:
                f.pwrite(src).get()
                f.fsync()
        assert info.value.errno == errno.ENOSPC, (kind, info.value)
        assert path in str(info.value) and "at offset" in str(info.value)
    finally:
        if os.path.exists(path):
            os.remove(path)


def test_bad_requests_are_one_line_errors(tmp_path):
    path = tmp_path / "bad.bin"
    buf = aligned_empty(4 * ALIGN)
    with DirectFile(path, "rw") as f:
        with pytest.raises(ValueError, match="not a multiple of 4096"):
            f.pread(buf, file_offset=100)
        with pytest.raises(ValueError, match="does not fit"):
            f.pwrite(buf, size=5 * ALIGN)
        if f.direct:
            raw = torch.empty(8 * ALIGN, dtype=torch.uint8)
            off = (-raw.data_ptr()) % ALIGN + 1  # certainly misaligned
            with pytest.raises(ValueError, match="aligned_empty"):
                f.pread(raw[off : off + 2 * ALIGN])
        with pytest.raises(ValueError, match="contiguous"):
            f.pread(aligned_empty(4 * ALIGN).view(4, ALIGN).t())
    with pytest.raises(ValueError, match="mode"):
        DirectFile(path, "a")


def test_aligned_helpers():
    assert [aligned_bytes(n) for n in (0, 1, ALIGN, ALIGN + 1)] == [0, ALIGN, ALIGN, 2 * ALIGN]
    for n in (1, 1000, ALIGN + 1):
        b = aligned_empty(n)
        assert b.numel() == n and b.dtype == torch.uint8 and b.data_ptr() % ALIGN == 0


def test_registry(monkeypatch):
    with pytest.raises(ValueError, match="unknown I/O backend"):
        backends.get_backend("nope")
    names = backends.available_backends()
    assert "python" in names
    before = backends._default_name
    try:
        backends.set_default_backend("python")
        assert backends.default_backend_name() == "python"
        backends.set_default_backend("auto")
        # "auto" takes the first runnable of uring, threads, python.
        expected = next(n for n in backends.AUTO_ORDER if n in names)
        assert backends.default_backend_name() == expected
    finally:
        backends._default_name = before
