"""Block store: layout, versioned writes, atomic commit, garbage collection, path safety."""
import json
import os

import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim.state import KINDS
from fuyou.store.directio import aligned_empty
from fuyou.store.store import (
    PART_ALIGN,
    StoreError,
    create_store,
    finalize_import,
    new_manifest,
    open_store,
    read_manifest,
)


def make_store(path, shapes=((3, 5), (4097,), (1,))):
    blocks = [{"name": "blk", "params": [{"name": f"p{i}", "shape": list(s), "numel": int(torch.Size(s).numel())} for i, s in enumerate(shapes)]}]
    store = create_store(str(path), new_manifest({"source": "test", "fingerprint": "x"}, StateConfig(), blocks), None)
    for kind in KINDS:
        lay = store.layouts["blk"].kinds[kind]
        buf = aligned_empty(lay.file_bytes).zero_()
        for name, parts in lay.views(buf).items():
            parts["value"].copy_(torch.arange(parts["value"].numel(), dtype=torch.float32))
        store.write("blk", kind, buf, version=0)
    finalize_import(store)
    return store


def test_layout_alignment_and_views(tmp_path):
    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["master"]
    assert all(p.offset % PART_ALIGN == 0 for p in lay.parts)
    assert lay.file_bytes % 4096 == 0 and lay.file_bytes >= lay.nbytes
    buf = aligned_empty(lay.file_bytes)
    store.read("blk", "master", buf)
    for name, parts in lay.views(buf).items():
        torch.testing.assert_close(parts["value"], torch.arange(parts["value"].numel(), dtype=torch.float32), rtol=0, atol=0)


def test_commit_switches_versions_and_deletes_old(tmp_path):
    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["master"]
    buf = aligned_empty(lay.file_bytes).fill_(7)
    store.write("blk", "master", buf, version=1)
    # Before the commit the live version is still 0.
    assert read_manifest(str(tmp_path / "s"))["blocks"][0]["versions"]["master"] == 0
    store.commit(1, {"blk": {"master": 1}}, {"data_position": 8})
    m = read_manifest(str(tmp_path / "s"))
    assert m["step"] == 1 and m["blocks"][0]["versions"]["master"] == 1 and m["train"] == {"data_position": 8}
    assert not os.path.exists(store.file_path("blk", "master", 0))
    out = aligned_empty(lay.file_bytes)
    store.read("blk", "master", out)
    assert bool((out[: lay.nbytes] == 7).all())


def test_uncommitted_files_are_collected_on_open(tmp_path):
    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["exp_avg"]
    store.write("blk", "exp_avg", aligned_empty(lay.file_bytes).zero_(), version=1)  # a step that never committed
    (tmp_path / "s" / "manifest.json.tmp").write_text("{partial")
    reopened = open_store(str(tmp_path / "s"))
    assert not os.path.exists(reopened.file_path("blk", "exp_avg", 1))
    assert os.path.exists(reopened.file_path("blk", "exp_avg", 0))
    assert not (tmp_path / "s" / "manifest.json.tmp").exists()


def test_refuses_to_overwrite_live_version(tmp_path):
    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["weights"]
    with pytest.raises(StoreError, match="overwrite live"):
        store.write("blk", "weights", aligned_empty(lay.file_bytes), version=0)


def test_manifest_paths_stay_inside_the_store(tmp_path):
    store = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="outside the store"):
        store._safe_path("../evil.bin")
    with pytest.raises(StoreError, match="outside the store"):
        store._safe_path("/etc/passwd")
    m = json.load(open(tmp_path / "s" / "manifest.json"))
    m["blocks"][0]["name"] = "../../x"
    json.dump(m, open(tmp_path / "s" / "manifest.json", "w"))
    with pytest.raises(StoreError):
        open_store(str(tmp_path / "s")).file_path("../../x", "master", 0)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a fuyou store"):
        open_store(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(StoreError, match="not a fuyou store"):
        open_store(str(tmp_path))


def test_files_respect_umask(tmp_path):
    store = make_store(tmp_path / "s")
    mode = os.stat(store.file_path("blk", "master", 0)).st_mode
    assert not mode & 0o002, "store files must not be world-writable"


@pytest.mark.parametrize("corrupt_at", [None, 0, 9000], ids=["intact", "first-piece", "later-piece"])
def test_piecewise_read_verifies_every_piece(tmp_path, monkeypatch, corrupt_at):
    """Reads go out as pieces whose checksum runs while the later ones are in flight: the bytes and
    the verdict are those of one whole-file read, wherever a flipped byte sits."""
    from fuyou.store import store as store_mod

    monkeypatch.setattr(store_mod, "READ_PIECE_BYTES", 4096)  # a 16 KiB file: 5 pieces, the last one a tail
    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["master"]
    assert lay.nbytes > 4 * 4096 and lay.nbytes % 4096
    if corrupt_at is not None:
        path = store.file_path("blk", "master", 0)
        with open(path, "r+b") as f:
            f.seek(corrupt_at)
            b = f.read(1)
            f.seek(corrupt_at)
            f.write(bytes([b[0] ^ 0x40]))
    out = aligned_empty(lay.file_bytes)
    if corrupt_at is not None:
        with pytest.raises(StoreError, match="checksum mismatch"):
            store.read("blk", "master", out)
        return
    store.read("blk", "master", out)
    for name, parts in lay.views(out).items():
        torch.testing.assert_close(parts["value"], torch.arange(parts["value"].numel(), dtype=torch.float32), rtol=0, atol=0)
