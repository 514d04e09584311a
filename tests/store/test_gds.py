"""Device-buffer I/O (fuyou.store.gds): kvikio where it works, the DirectFile path otherwise."""
from __future__ import annotations

import errno

import pytest
import torch

from fuyou.store import ALIGN, DirectFile, aligned_empty, backends, gds

KVIKIO_OK, KVIKIO_WHY = gds.kvikio_status()
needs_kvikio = pytest.mark.skipif(not KVIKIO_OK, reason=f"kvikio cannot do I/O here: {KVIKIO_WHY}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(), (1,), (1000,), (129, 257), (1024 + 3,)]  # odd sizes: tails inside the last 4 KiB


def _tensor(shape, device="cpu", seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _roundtrip(tmp_path, device):
    for i, shape in enumerate(SHAPES):
        path = tmp_path / f"t{i}.bin"
        src = _tensor(shape, device, seed=i)
        nbytes = src.numel() * src.element_size()
        with DirectFile(path, "w") as f:  # something in front of the tensor, kept by the write
            f.pwrite(aligned_empty(ALIGN).fill_(7)).get()
        assert gds.write_from_device(path, src, file_offset=ALIGN) == nbytes
        dst = torch.full(shape, float("nan"), device=device)
        assert gds.read_into_device(path, dst, file_offset=ALIGN) == nbytes
        torch.testing.assert_close(dst, src, rtol=0, atol=0)  # bytes moved, never arithmetic
        with open(path, "rb") as raw:
            assert raw.read(ALIGN) == bytes([7]) * ALIGN


def test_cpu_tensor_roundtrip(tmp_path):
    _roundtrip(tmp_path, "cpu")


def test_partial_read_and_async_future(tmp_path):
    path = tmp_path / "p.bin"
    src = _tensor((3000,), seed=7)
    assert gds.write_from_device(path, src) == 12000
    dst = torch.zeros(3000)
    fut = gds.submit_device("read", path, dst, 0, nbytes=1000 * 4)
    assert fut.get() == 4000 and fut.done()
    torch.testing.assert_close(dst[:1000], src[:1000], rtol=0, atol=0)
    assert bool((dst[1000:] == 0).all())


def test_errors(tmp_path):
    path = tmp_path / "e.bin"
    with DirectFile(path, "w") as f:
        f.pwrite(aligned_empty(ALIGN).zero_()).get()
    with pytest.raises(ValueError, match="op must be"):
        gds.submit_device("append", path, torch.zeros(4))
    with pytest.raises(ValueError, match="does not fit"):
        gds.read_into_device(path, torch.zeros(4), nbytes=17)
    with pytest.raises(ValueError, match="multiple of 4096"):
        gds.read_into_device(path, torch.zeros(4), file_offset=12)
    with pytest.raises(OSError) as info:  # the file holds 4 KiB, the read asks for 16
        gds.read_into_device(path, torch.zeros(4096))
    assert info.value.errno == errno.EIO and str(path) in str(info.value)


def test_kvikio_backend_registered_only_when_it_works():
    backends._load_optional_backends()
    assert ("kvikio" in backends.available_backends()) == KVIKIO_OK
    if not KVIKIO_OK:
        assert KVIKIO_WHY  # the reason is there to show
        with pytest.raises(RuntimeError):
            gds.KvikioBackend()


@needs_kvikio
def test_kvikio_backend_directfile(tmp_path):
    src = aligned_empty(3 * (1 << 20) + 5)
    src.copy_(torch.randint(0, 256, (src.numel(),), dtype=torch.uint8))
    dst = aligned_empty(src.numel())
    with DirectFile(tmp_path / "k.bin", "rw", backend="kvikio") as f:
        f.pwrite(src).get()
        f.pread(dst).get()
    assert torch.equal(dst, src)


@needs_cuda
def test_cuda_tensor_roundtrip(tmp_path):
    """Through kvikio when it works here, else the pinned bounce path; same bytes either way."""
    _roundtrip(tmp_path, "cuda")
