"""A step commits on every rank or on none: a two-phase commit over the ranks' stores.

    commit_step   each rank makes its next manifest durable beside the live one (prepare), waits
                  until every rank has, then switches to it (commit_prepared)
    reconcile     at the start of a run, after a crash: the ranks compare how far each store got
                  and bring every store to the last step all of them can reach

No rank commits before every rank has prepared, so when one store is a commit ahead, every other
holds that commit prepared and rolls forward to it; when none is ahead, a prepared step is dropped
(some rank may never have prepared it). A commit is counted in the manifest's train entry
(`commits`), which both phases compare.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from ..store.layout import StateLayout
from ..store.manifest import StoreError, is_store, read_manifest, read_prepared
from ..store.prepared import commit_prepared, drop_prepared, prepare
from ..store.store import Store
from .group import RankGroup


def commits_of(manifest: Optional[dict]) -> Optional[int]:
    return None if manifest is None else int(manifest.get("train", {}).get("commits", 0))


def commit_step(store: Store, group: RankGroup, step: int, versions: Dict[str, Dict[str, int]], train_meta: dict) -> None:
    """Commit `step` in this rank's store once every rank's is durable (see the module docstring)."""
    meta = dict(train_meta, commits=commits_of(store.manifest) + 1)
    prepare(store, step, versions, meta)
    group.barrier()  # every rank's next manifest is durable: the step is decided
    commit_prepared(store)


def reconcile(path: str, group: RankGroup, state_from_json: Callable[[dict], StateLayout]) -> None:
    """Bring this rank's store (if it is one) to the commit every rank's store can reach; refuse, on
    every rank alike, stores that are not one run's. Every rank runs the same collectives whatever
    its store holds (a failure on one is raised on all)."""
    manifest, prepared = group.agree(lambda: _look(path))
    reports = group.gather([commits_of(manifest), commits_of(prepared)])
    committed = [c for c, _p in reports if c is not None]
    if not committed:
        return  # a new run (prepare() refuses a mix of new and existing stores)
    target = max(committed)
    stuck = {r: c for r, (c, p) in enumerate(reports) if c is not None and c != target and not (c == target - 1 and p == target)}
    if stuck:
        raise StoreError(f"the ranks' stores are at different commits ({', '.join(f'rank {r}: {c}' for r, (c, _p) in enumerate(reports))}) and "
                         f"rank(s) {', '.join(map(str, stuck))} cannot reach commit {target}; they are not the stores of one run: pass each rank "
                         "its own store of this run ({rank} in --store)")
    group.agree(lambda: _bring(path, manifest, prepared, target, state_from_json))


def _look(path: str) -> tuple:
    """(manifest, prepared manifest) of the store at `path`, each None when there is none."""
    manifest = read_manifest(path) if is_store(path) else None
    return manifest, read_prepared(path) if manifest is not None else None


def _bring(path: str, manifest: Optional[dict], prepared: Optional[dict], target: int, state_from_json) -> None:
    """Commit the prepared step that brings this store to `target`, or drop one beyond it."""
    if manifest is None or prepared is None:
        return
    store = Store(path, manifest, state_from_json(manifest["state"]))
    if commits_of(manifest) == target:
        drop_prepared(store)  # never committed by any rank (or committed here already)
    else:
        commit_prepared(store)
