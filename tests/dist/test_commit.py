"""The two-phase commit of a data-parallel step on one rank's store: a prepared manifest keeps its
files live, commits or drops atomically, and `reconcile` brings a store to the commit every rank
can reach (the other ranks' reports given by hand here; tests/dist/test_data_parallel.py runs ranks)."""
import json
import os

import pytest

from fuyou.config import StateConfig
from fuyou.dist.commit import commits_of, reconcile
from fuyou.optim.state import KINDS, StateCodecs
from fuyou.store.directio import aligned_empty
from fuyou.store.manifest import PREPARED, StoreError, new_manifest, read_manifest
from fuyou.store.prepared import commit_prepared, drop_prepared, prepare
from fuyou.store.store import Store, create_store, finalize_import, open_store

BLOCKS = [{"name": n, "params": [{"name": f"{n}.w", "shape": [3, 5], "numel": 15}]} for n in ("embed", "layer0000", "head")]


def make_store(path, weights_only=("layer0000",)):
    state = StateCodecs(StateConfig())
    store = create_store(str(path), new_manifest({"source": "t", "fingerprint": "x"}, state, BLOCKS, {"commits": 0}, weights_only=weights_only),
                         state, None)
    for b in store.block_names:
        for kind, kl in store.layouts[b].kinds.items():
            store.write(b, kind, aligned_empty(kl.file_bytes).fill_(1), version=0)
    finalize_import(store)
    return open_store(str(path), StateCodecs.from_json)


def write_step(store, step, fill):
    versions = {}
    for b in store.block_names:
        for kind, kl in store.layouts[b].kinds.items():
            store.write(b, kind, aligned_empty(kl.file_bytes).fill_(fill), version=step)
            versions.setdefault(b, {})[kind] = step
    return versions


def test_a_block_held_by_another_rank_keeps_its_weights_alone(tmp_path):
    store = make_store(tmp_path / "s")
    assert list(store.layouts["layer0000"].kinds) == ["weights"]
    assert list(store.layouts["embed"].kinds) == list(KINDS)
    files = sorted(os.listdir(tmp_path / "s" / "blocks"))
    assert [f for f in files if f.startswith("layer0000")] == ["layer0000.weights.0.bin"]
    full = make_store(tmp_path / "full", weights_only=())
    assert full.state_bytes() - store.state_bytes() == sum(store.layouts["embed"].kinds[k].file_bytes for k in KINDS if k != "weights")


def test_a_manifest_mixing_other_kinds_is_refused(tmp_path):
    make_store(tmp_path / "s")
    m = read_manifest(str(tmp_path / "s"))
    m["blocks"][1]["versions"] = {"weights": 0, "master": 0}
    with pytest.raises(StoreError, match="damaged"):
        Store(str(tmp_path / "s"), m, StateCodecs(StateConfig()))


def test_prepared_step_stays_live_until_committed_or_dropped(tmp_path):
    store = make_store(tmp_path / "s")
    prepare(store, 1, write_step(store, 1, 2), {"commits": 1})
    assert os.path.isfile(tmp_path / "s" / PREPARED)
    assert read_manifest(str(tmp_path / "s"))["step"] == 0  # not committed
    reopened = open_store(str(tmp_path / "s"), StateCodecs.from_json)  # its garbage collection keeps the prepared files
    assert commits_of(reopened.prepared) == 1 and os.path.isfile(reopened.file_path("head", "master", 1))
    commit_prepared(reopened)
    m = read_manifest(str(tmp_path / "s"))
    assert m["step"] == 1 and commits_of(m) == 1 and not os.path.exists(tmp_path / "s" / PREPARED)
    assert not os.path.exists(reopened.file_path("head", "master", 0))  # superseded versions deleted
    buf = aligned_empty(reopened.layouts["head"].kinds["master"].file_bytes)
    reopened.read("head", "master", buf)  # the prepared checksums are the committed ones
    assert bool((buf[: reopened.kind_nbytes("head", "master")] == 2).all())
    prepare(reopened, 2, write_step(reopened, 2, 3), {"commits": 2})
    drop_prepared(reopened)
    again = open_store(str(tmp_path / "s"), StateCodecs.from_json)
    assert again.step == 1 and not os.path.exists(again.file_path("head", "master", 2))


class Ranks:
    """A group whose other ranks report what the test says (reconcile's collectives, in one process)."""

    def __init__(self, rank, others):
        self.rank, self.others = rank, others

    def agree(self, fn):
        return fn()

    def gather(self, obj):
        out = list(self.others)
        out.insert(self.rank, json.loads(json.dumps(obj)))
        return out


def test_reconcile_rolls_a_prepared_step_forward_when_a_peer_committed_it(tmp_path):
    store = make_store(tmp_path / "s")
    prepare(store, 1, write_step(store, 1, 2), {"commits": 1})
    reconcile(str(tmp_path / "s"), Ranks(1, [[1, None]]), StateCodecs.from_json)  # rank 0 committed commit 1
    m = read_manifest(str(tmp_path / "s"))
    assert m["step"] == 1 and commits_of(m) == 1 and not os.path.exists(tmp_path / "s" / PREPARED)


def test_reconcile_drops_a_prepared_step_no_rank_committed(tmp_path):
    store = make_store(tmp_path / "s")
    prepare(store, 1, write_step(store, 1, 2), {"commits": 1})
    reconcile(str(tmp_path / "s"), Ranks(0, [[0, None]]), StateCodecs.from_json)  # rank 1 never prepared it
    assert read_manifest(str(tmp_path / "s"))["step"] == 0 and not os.path.exists(tmp_path / "s" / PREPARED)
    reopened = open_store(str(tmp_path / "s"), StateCodecs.from_json)
    assert not os.path.exists(reopened.file_path("head", "master", 1))


def test_reconcile_refuses_stores_of_different_runs(tmp_path):
    make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="not the stores of one run"):
        reconcile(str(tmp_path / "s"), Ranks(0, [[2, None]]), StateCodecs.from_json)
    assert read_manifest(str(tmp_path / "s"))["step"] == 0  # untouched


def test_reconcile_leaves_new_runs_and_settled_stores_alone(tmp_path):
    reconcile(str(tmp_path / "none"), Ranks(0, [[None, None]]), StateCodecs.from_json)
    assert not os.path.exists(tmp_path / "none")
    store = make_store(tmp_path / "s")
    before = sorted(os.listdir(store.root + "/blocks"))
    reconcile(str(tmp_path / "s"), Ranks(0, [[0, None]]), StateCodecs.from_json)
    assert sorted(os.listdir(store.root + "/blocks")) == before and read_manifest(store.root)["step"] == 0
