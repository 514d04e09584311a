"""Block store: layout, versioned writes, atomic commit, garbage collection, path safety."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim.state import KINDS, StateCodecs
from fuyou.store.directio import aligned_empty
from fuyou.store.layout import PART_ALIGN, PartSpec
from fuyou.store.store import create_store, finalize_import, open_store
from fuyou.store.manifest import StoreError, new_manifest, read_manifest


def make_store(path, shapes=((3, 5), (4097,), (1,))):
    blocks = [{"name": "blk", "params": [{"name": f"p{i}", "shape": list(s), "numel": int(torch.Size(s).numel())} for i, s in enumerate(shapes)]}]
    state = StateCodecs(StateConfig())
    store = create_store(str(path), new_manifest({"source": "test", "fingerprint": "x"}, state, blocks), state, None)
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
    store.settle()  # the superseded version is deleted on the store's deleter thread
    assert not os.path.exists(store.file_path("blk", "master", 0))
    out = aligned_empty(lay.file_bytes)
    store.read("blk", "master", out)
    assert bool((out[: lay.nbytes] == 7).all())


def test_superseded_files_are_deleted_before_the_next_write(tmp_path, monkeypatch):
    """The commit hands its superseded files to the deleter and returns; the next new file waits
    until they are gone, so the disk holds no third version of anything."""
    import threading

    import fuyou.store.deleter as deleter

    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["master"]
    buf = aligned_empty(lay.file_bytes).fill_(7)
    store.write("blk", "master", buf, version=1)
    release, unlink = threading.Event(), os.unlink

    def held_unlink(path):
        release.wait()
        unlink(path)

    monkeypatch.setattr(deleter.os, "unlink", held_unlink)
    store.commit(1, {"blk": {"master": 1}})  # returns with version 0 still on disk
    assert os.path.exists(store.file_path("blk", "master", 0))
    writer = threading.Thread(target=store.write, args=("blk", "master", buf, 2))
    writer.start()
    writer.join(0.3)
    assert writer.is_alive() and not os.path.exists(store.file_path("blk", "master", 2))  # held until the deletion
    release.set()
    writer.join()
    assert not os.path.exists(store.file_path("blk", "master", 0)) and os.path.exists(store.file_path("blk", "master", 2))


def test_a_failed_deletion_is_raised_once(tmp_path):
    from fuyou.store.deleter import Deleter

    d = Deleter()
    (tmp_path / "dir").mkdir()
    (tmp_path / "f").write_text("x")
    d.submit([str(tmp_path / "dir"), str(tmp_path / "f"), str(tmp_path / "gone")])  # a directory cannot be unlinked; a missing file is fine
    with pytest.raises(OSError):
        d.settle()
    d.settle()
    assert not (tmp_path / "f").exists() and (tmp_path / "dir").exists()


def test_uncommitted_files_are_collected_on_open(tmp_path):
    store = make_store(tmp_path / "s")
    lay = store.layouts["blk"].kinds["exp_avg"]
    store.write("blk", "exp_avg", aligned_empty(lay.file_bytes).zero_(), version=1)  # a step that never committed
    (tmp_path / "s" / "manifest.json.tmp").write_text("{partial")
    reopened = open_store(str(tmp_path / "s"), StateCodecs.from_json)
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
        open_store(str(tmp_path / "s"), StateCodecs.from_json).file_path("../../x", "master", 0)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a fuyou store"):
        open_store(str(tmp_path), StateCodecs.from_json)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(StoreError, match="not a fuyou store"):
        open_store(str(tmp_path), StateCodecs.from_json)


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


class _ToyLayout:
    """A state layout that is not the optimizer's: the store takes its kinds and parts as given."""

    kinds = ("alpha", "beta")

    def parts(self, kind, numel, shape=None):
        return [PartSpec("x", numel, torch.float32)] + ([PartSpec("tail", 3, torch.int16)] if kind == "beta" else [])

    def to_json(self):
        return {"toy": 1}


def test_store_takes_kinds_and_parts_from_its_layout(tmp_path):
    root = str(tmp_path / "toy")
    blocks = [{"name": "blk", "params": [{"name": "w", "shape": [5], "numel": 5}]}]
    manifest = new_manifest({"source": "test", "fingerprint": "x"}, _ToyLayout(), blocks)
    assert manifest["state"] == {"toy": 1} and manifest["blocks"][0]["versions"] == {"alpha": 0, "beta": 0}
    store = create_store(root, manifest, _ToyLayout(), None)
    assert [(p.part, p.offset) for p in store.layouts["blk"].kinds["beta"].parts] == [("x", 0), ("tail", PART_ALIGN)]
    for kind in _ToyLayout.kinds:
        store.write("blk", kind, aligned_empty(store.layouts["blk"].kinds[kind].file_bytes).zero_(), version=0)
    finalize_import(store)
    store.write("blk", "beta", aligned_empty(store.layouts["blk"].kinds["beta"].file_bytes).zero_(), version=1)  # never committed
    seen = []
    reopened = open_store(root, lambda entry: seen.append(entry) or _ToyLayout())
    assert seen == [{"toy": 1}] and reopened.kinds == ("alpha", "beta")
    assert not os.path.exists(reopened.file_path("blk", "beta", 1)) and os.path.exists(reopened.file_path("blk", "beta", 0))


@pytest.mark.parametrize("kind", ["../x", "a/b", "a.b", "grad", ""])
def test_store_refuses_kind_names_that_are_not_plain(tmp_path, kind):
    layout = _ToyLayout()
    layout.kinds = ("alpha", kind)
    with pytest.raises(ValueError, match="state kinds"):
        create_store(str(tmp_path / "bad"), new_manifest({"source": "test", "fingerprint": "x"}, layout, []), layout, None)


def test_store_does_not_import_the_optimizer():
    code = "import sys, fuyou.store.store, fuyou.store.layout; print(sorted(m for m in sys.modules if m.startswith('fuyou.optim')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gaps_and_parts_tile_the_file(tmp_path):
    """Parts and gaps cover every byte of a kind's file exactly once; zero_gaps zeroes the gaps only."""
    store = make_store(tmp_path / "s", shapes=((3, 5), (4097,), (1,), (7, 300)))
    for kind in KINDS:
        lay = store.layouts["blk"].kinds[kind]
        covered = torch.zeros(lay.file_bytes, dtype=torch.int32)
        for p in lay.parts:
            covered[p.offset : p.offset + PartSpec(p.part, p.numel, p.dtype).nbytes] += 1
        for start, end in lay.gaps():
            covered[start:end] += 1
        assert torch.all(covered == 1), kind
        buf = torch.full((lay.file_bytes,), 7, dtype=torch.uint8)
        lay.zero_gaps(buf)
        for start, end in lay.gaps():
            assert torch.all(buf[start:end] == 0)
        assert int((buf == 7).sum()) == lay.nbytes - sum(end - start for start, end in lay.gaps() if end <= lay.nbytes)
