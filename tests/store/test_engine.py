"""The C++ engine (fuyou._io) through fuyou.store.engine: chunking, fault hook, errno, fixed buffers."""
from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fuyou.store import ALIGN, DirectFile, aligned_empty
from fuyou.store.backends import PythonBackend

engine = pytest.importorskip("fuyou.store.engine")
if engine._io is None:
    pytest.skip("fuyou._io is not built (python setup.py build_ext --inplace)", allow_module_level=True)

from fuyou.store.engine import EngineBackend, EngineConfig, measure_disk, uring_works  # noqa: E402

KINDS = ["threads"] + (["uring"] if uring_works() else [])
CHUNK = 64 << 10


def _random(nbytes: int, seed: int = 0) -> torch.Tensor:
    buf = aligned_empty(nbytes)
    buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return buf


@pytest.fixture
def data_file(tmp_path):
    """A 1 MiB + 3 KiB file (17 chunks of 64 KiB, the last one short) and its bytes."""
    src = _random((1 << 20) + 3 * 1024, seed=1)
    path = tmp_path / "d.bin"
    with DirectFile(path, "w", backend="python") as f:
        f.pwrite(src).get()
    return str(path), src


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("queue_depth", [1, 3, 64])
def test_chunked_request_in_flight(data_file, kind, queue_depth):
    path, src = data_file
    be = EngineBackend(kind, EngineConfig(queue_depth=queue_depth, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    with DirectFile(path, "r", backend=be) as f:
        assert f.pread(dst).get() == src.numel()
    assert torch.equal(dst, src)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_fault_names_path_and_offset(data_file, kind):
    path, src = data_file
    be = EngineBackend(kind, EngineConfig(queue_depth=1, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    with DirectFile(path, "r", backend=be) as f:
        be.set_fault(3, errno.EIO)  # one in flight: the 3rd transfer is the 3rd chunk
        with pytest.raises(OSError) as info:
            f.pread(dst).get()
        assert info.value.errno == errno.EIO
        assert path in str(info.value) and f"at offset {2 * CHUNK}" in str(info.value)
        # The fault fired once: the next request runs clean.
        assert f.pread(dst).get() == src.numel()
    assert torch.equal(dst, src)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_fault_with_many_in_flight_waits_for_all(data_file, kind):
    path, src = data_file
    be = EngineBackend(kind, EngineConfig(queue_depth=8, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    with DirectFile(path, "r", backend=be) as f:
        be.set_fault(5, errno.ENOSPC)
        fut = f.pread(dst)
        with pytest.raises(OSError) as info:
            fut.get()
        assert fut.done()  # every chunk finished before the error was raised
    assert info.value.errno == errno.ENOSPC
    assert any(f"at offset {i * CHUNK}" in str(info.value) for i in range(17))


@pytest.mark.parametrize("kind", KINDS)
def test_injected_short_transfers_are_finished(data_file, kind):
    path, src = data_file
    be = EngineBackend(kind, EngineConfig(queue_depth=4, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    with DirectFile(path, "r", backend=be) as f:
        for nth in (1, 2, 17):
            be.set_fault(nth, 0, short_bytes=ALIGN)  # that transfer moves 4 KiB of its 64 KiB
            dst.zero_()
            assert f.pread(dst).get() == src.numel()
            assert torch.equal(dst, src)
    out = aligned_empty(src.numel())
    with DirectFile(path, "w", backend=be) as f:  # and for writes
        be.set_fault(2, 0, short_bytes=2 * ALIGN)
        f.pwrite(src).get()
    with DirectFile(path, "r", backend="python") as f:
        f.pread(out).get()
    assert torch.equal(out, src)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_errno_is_reported_per_request(data_file, kind):
    path, src = data_file
    be = EngineBackend(kind, EngineConfig(queue_depth=4, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    with DirectFile(path, "r", backend=be) as f:
        bad = be.submit("write", f.fd, dst.data_ptr(), CHUNK, 0, path)  # fd opened read-only
        good = f.pread(dst)
        with pytest.raises(OSError) as info:
            bad.result()
        assert good.get() == src.numel()
    assert info.value.errno == errno.EBADF and "write of" in str(info.value)
    assert torch.equal(dst, src)


@pytest.mark.skipif("uring" not in KINDS, reason="io_uring cannot run here")
def test_uring_registered_buffers(data_file):
    path, src = data_file
    be = EngineBackend("uring", EngineConfig(queue_depth=4, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    assert be.register_buffers([dst])
    try:
        with DirectFile(path, "r", backend=be) as f:
            assert f.pread(dst).get() == src.numel()
    finally:
        assert be.register_buffers([])
    assert torch.equal(dst, src)
    # Body: 16 chunks of 64 KiB, all inside the registered buffer; the 3 KiB tail goes through
    # DirectFile's own bounce buffer (not registered).
    assert be.fixed_transfers == 16
    assert EngineBackend("threads").register_buffers([dst]) is False


def test_config_validation():
    with pytest.raises(ValueError, match="queue_depth"):
        EngineConfig(queue_depth=0)
    with pytest.raises(ValueError, match="multiple of 4096"):
        EngineConfig(chunk_bytes=1000)
    with pytest.raises(ValueError, match="engine kind"):
        engine._io.Engine("spdk", 4, CHUNK)
    with pytest.raises(ValueError, match="op must be"):
        EngineBackend("threads").submit("append", 0, 0, 0, 0, "x")


def test_missing_extension_falls_back_to_python():
    code = (
        "import sys, logging; sys.modules['fuyou._io'] = None\n"
        "from fuyou.store import backends\n"
        "print(backends.get_backend('auto').name, backends.get_backend(None).name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FUYOU_IO_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "python"]
    assert out.stderr.count("fuyou._io is not built") == 1


def test_measure_disk_reports_rates(tmp_path):
    res = measure_disk(str(tmp_path / "probe.bin"), size_bytes=4 << 20, request_bytes=1 << 20, queue_depth=2, runs=1)
    assert res["backend"] in KINDS
    assert res["read_gbps"] > 0 and res["write_gbps"] > 0
    assert res["size_bytes"] == 4 << 20
    assert not os.path.exists(tmp_path / "probe.bin")


@pytest.mark.parametrize("kind", KINDS)
def test_requests_from_many_threads(data_file, kind):
    path, src = data_file
    be = EngineBackend(kind, EngineConfig(queue_depth=4, chunk_bytes=CHUNK))
    n = src.numel()
    dsts = [[aligned_empty(n) for _ in range(8)] for _ in range(4)]

    def reader(bufs):
        with DirectFile(path, "r", backend=be) as f:
            futs = [f.pread(b) for b in bufs]
            return [fut.get() for fut in futs]

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(reader, dsts))
    assert done == [[n] * 8] * 4
    for bufs in dsts:
        for b in bufs:
            assert torch.equal(b, src)


@pytest.mark.parametrize("kind", KINDS + ["python"])
def test_engine_works_in_a_forked_child(data_file, kind):
    path, src = data_file
    if kind == "python":
        be = PythonBackend(threads=2, chunk_bytes=CHUNK)
    else:
        be = EngineBackend(kind, EngineConfig(queue_depth=2, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    with DirectFile(path, "r", backend=be) as f:
        f.pread(dst).get()  # the parent's engine has started its threads
    expected = src.numpy().tobytes()
    pid = os.fork()
    if pid == 0:  # child: gets a fresh engine; exits without the inherited one's destructor
        code = 1
        try:  # no torch kernels here: its OpenMP pool may not survive fork()
            ctypes.memset(dst.data_ptr(), 0, dst.numel())
            with DirectFile(path, "r", backend=be) as f:
                f.pread(dst).get()
            code = 0 if ctypes.string_at(dst.data_ptr(), dst.numel()) == expected else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with DirectFile(path, "r", backend=be) as f:  # the parent's engine is untouched
        assert f.pread(dst).get() == src.numel()


@pytest.mark.skipif("uring" not in KINDS, reason="io_uring cannot run here")
def test_register_splits_at_the_fixed_buffer_limit(data_file, monkeypatch):
    path, src = data_file
    monkeypatch.setattr(engine, "_FIXED_MAX_BYTES", 256 << 10)  # 1 GiB in production; small here
    be = EngineBackend("uring", EngineConfig(queue_depth=4, chunk_bytes=CHUNK))
    dst = aligned_empty(src.numel())
    assert be.register_buffers([dst])  # 5 pieces, the last one short
    try:
        with DirectFile(path, "r", backend=be) as f:
            assert f.pread(dst).get() == src.numel()
    finally:
        be.register_buffers([])
    assert torch.equal(dst, src)
    assert be.fixed_transfers == 16  # 64 KiB chunks never straddle the 256 KiB pieces
