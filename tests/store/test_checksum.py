"""The store's checksums: CRC-32C on the hardware path against a bit-by-bit reference, the manifest
naming it, and stores of format version 1 (zlib CRC-32, no name) still read, verified and kept as they are."""
import json
import os
import zlib

import pytest
import torch

from fuyou.store import checksum
from fuyou.store.directio import aligned_empty
from fuyou.store.manifest import MANIFEST, StoreError, read_manifest
from fuyou.store.store import open_store
from fuyou.optim.state import StateCodecs

from .test_store import make_store

needs_engine = pytest.mark.skipif(checksum._ext is None or not hasattr(checksum._ext, "crc32c"), reason="fuyou._io not built")


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC-32C one bit at a time (reflected polynomial 0x82F63B78): the definition."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@needs_engine
def test_crc32c_check_value_and_bitwise_reference():
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the published check value of CRC-32C
    buf = torch.frombuffer(bytearray(b"123456789"), dtype=torch.uint8)
    assert checksum.checksum_fn("crc32c")(buf, 9, 0) == 0xE3069283
    gen = torch.Generator().manual_seed(5)
    data = torch.randint(0, 256, (5000,), generator=gen, dtype=torch.uint8)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4999):
        assert checksum.checksum_fn("crc32c")(data, n, 0) == crc32c_bitwise(data[:n].numpy().tobytes())


@needs_engine
def test_hardware_crc32c_equals_portable_at_every_block_shape():
    """Sizes across the three-stream blocks (3 x 256 KiB, the shorter last block, the single
    stream below 12 KiB), unaligned starts, and continuation piece by piece."""
    gen = torch.Generator().manual_seed(6)
    data = torch.randint(0, 256, ((3 << 20) + 4099,), generator=gen, dtype=torch.uint8)
    fn = checksum.checksum_fn("crc32c")
    for off, n in [(0, data.numel()), (1, 3 * (256 << 10)), (3, 3 * (256 << 10) + 17), (5, 12288), (7, 12287), (2, 100003)]:
        piece = data[off : off + n]
        assert fn(piece.clone(), n, 0) == checksum._ext.crc32c_portable(piece.numpy().tobytes()), (off, n)
    whole = fn(data, data.numel(), 0)
    running = 0
    for start in range(0, data.numel(), 1 << 20):  # as the store checks a read piece by piece
        piece = data[start : start + (1 << 20)]
        running = fn(piece, piece.numel(), running)
    assert running == whole


def test_names():
    assert checksum.checksum_fn("crc32")(torch.ones(10, dtype=torch.uint8), 10, 0) == zlib.crc32(bytes([1] * 10))
    with pytest.raises(ValueError, match="unknown"):
        checksum.checksum_fn("md5")
    assert checksum.default_checksum() in checksum.CHECKSUMS


def _corrupt_one_byte(path):
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))


def test_new_store_names_its_checksum_and_verifies_with_it(tmp_path):
    store = make_store(tmp_path / "s")
    m = read_manifest(str(tmp_path / "s"))
    assert m["format_version"] == 2 and m["checksum"] == checksum.default_checksum() == store.checksum
    lay = store.layouts["blk"].kinds["master"]
    buf = aligned_empty(lay.file_bytes)
    store.read("blk", "master", buf)  # verified
    want = checksum.checksum_fn(m["checksum"])(buf, lay.nbytes, 0)
    assert m["blocks"][0]["crc32"]["master"] == want
    _corrupt_one_byte(store.file_path("blk", "master", 0))
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.read("blk", "master", buf)


def _as_version_1(root):
    """Rewrite a store as fuyou wrote them before the checksum had a name: format_version 1, no
    "checksum" entry, zlib CRC-32 values."""
    path = os.path.join(root, MANIFEST)
    with open(path) as f:
        m = json.load(f)
    store = open_store(root, StateCodecs.from_json)
    for b in m["blocks"]:
        for kind, v in b["versions"].items():
            lay = store.layouts[b["name"]].kinds[kind]
            buf = aligned_empty(lay.file_bytes)
            store.read(b["name"], kind, buf)
            b["crc32"][kind] = zlib.crc32(memoryview(buf[: lay.nbytes].numpy()))
    m["format_version"] = 1
    del m["checksum"]
    with open(path, "w") as f:
        json.dump(m, f)


def test_version_1_store_reads_verified_and_stays_version_1(tmp_path):
    make_store(tmp_path / "s")
    _as_version_1(str(tmp_path / "s"))
    store = open_store(str(tmp_path / "s"), StateCodecs.from_json)
    assert store.checksum == "crc32"
    lay = store.layouts["blk"].kinds["master"]
    buf = aligned_empty(lay.file_bytes)
    store.read("blk", "master", buf)  # zlib CRC-32 values check out
    buf[: lay.nbytes].fill_(3)
    store.write("blk", "master", buf, version=1)
    store.commit(1, {"blk": {"master": 1}})
    m = read_manifest(str(tmp_path / "s"))
    assert m["format_version"] == 1 and "checksum" not in m
    assert m["blocks"][0]["crc32"]["master"] == zlib.crc32(memoryview(buf[: lay.nbytes].numpy()))
    _corrupt_one_byte(store.file_path("blk", "master", 1))
    with pytest.raises(StoreError, match="checksum mismatch"):
        open_store(str(tmp_path / "s"), StateCodecs.from_json).read("blk", "master", buf)


@pytest.mark.parametrize("edit,problem", [
    (lambda m: m.update(checksum="md5"), "checksum 'md5'"),
    (lambda m: m.pop("checksum"), "unexpected or missing"),
    (lambda m: m.update(format_version=1), "unexpected or missing"),  # version 1 names no checksum
    (lambda m: m.update(format_version=3), "format version 3"),
])
def test_manifest_checksum_entry_is_validated(tmp_path, edit, problem):
    make_store(tmp_path / "s")
    path = os.path.join(tmp_path / "s", MANIFEST)
    with open(path) as f:
        m = json.load(f)
    edit(m)
    with open(path, "w") as f:
        json.dump(m, f)
    with pytest.raises(StoreError, match=problem):
        read_manifest(str(tmp_path / "s"))


@pytest.mark.parametrize("name", [n for n in checksum.CHECKSUMS if checksum.available(n)])
def test_a_gradient_is_checksummed_as_its_bytes(name):
    """The store writes a block's fp32 gradient as it is (no uint8 view): its checksum is its bytes'."""
    g = torch.randn(1000)
    fn = checksum.checksum_fn(name)
    assert fn(g, 4000, 0) == fn(g.view(torch.uint8), 4000, 0)
    with pytest.raises(ValueError, match="4001 bytes"):
        fn(g, 4001, 0)
