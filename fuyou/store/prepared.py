"""A step prepared in a store but not yet committed: the first phase of a commit that several stores
(the ranks of a data-parallel run) must make together.

    prepare(store, step, versions, meta)   the next manifest, durable as manifest.prepared.json
    ... every rank has prepared ...        (fuyou.dist.commit waits for that)
    commit_prepared(store)                 it becomes the manifest; the old versions go
    drop_prepared(store)                   or it is forgotten; its files become garbage

While a prepared manifest exists, the files it names are live (the store's garbage collection keeps
them), so a rank that crashed after preparing can still commit the step its peers committed.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from .manifest import PREPARED, StoreError, fsync_dir, write_manifest
from .store import Store


def prepare(store: Store, step: int, versions: Dict[str, Dict[str, int]], train_meta: Optional[dict] = None) -> None:
    """Make the manifest of `step` durable beside the live one, without switching to it."""
    new = store.next_manifest(step, versions, train_meta)
    write_manifest(store.root, new, PREPARED)
    store.prepared = new


def commit_prepared(store: Store) -> None:
    """Switch the store to its prepared manifest (atomically), then forget it."""
    if store.prepared is None:
        raise StoreError(f"the store {store.root} has no prepared step to commit; it is damaged or was changed by hand")
    store.install(store.prepared)
    drop_prepared(store)


def drop_prepared(store: Store) -> None:
    """Forget the prepared manifest; the files only it named are deleted by the next garbage collection."""
    store.prepared = None
    try:
        os.unlink(os.path.join(store.root, PREPARED))
    except FileNotFoundError:
        return
    fsync_dir(store.root)
