"""The block cache: whole blocks' live states and compute weights kept in host RAM between steps.

Write-through: every step still writes each block's new files and commits the manifest, so crash
consistency is the store's. A cached kind is used only while the version it holds is the store's
live one (`store.version`), so a skipped step, a clipped step's redo (which reads the old states)
and a resumed run read the store; the first read of a kind fills the cache. Which blocks are cached
is the memory plan's choice (memory_plan.plan_cache).
"""
from __future__ import annotations

import threading
from typing import Dict, Sequence

import torch

from ..memory import Pool
from ..store.store import Store
from .slot_sizes import SLOT_KINDS, opt_region_offsets


class BlockCache:
    def __init__(self, store: Store, blocks: Sequence[str], budget_bytes: int):
        self.store = store
        self.pool = Pool("cache", budget_bytes, torch.device("cpu"))
        # Each block laid out as in an optimizer slot (master, moments, weights).
        self.entries = {b: self.pool.alloc(opt_region_offsets(store, b)["end"]) for b in blocks}
        self._versions: Dict[str, Dict[str, int]] = {b: {} for b in blocks}  # block -> kind -> version held
        self.hit_bytes = 0  # bytes served from memory instead of the store (only the read lane reads)
        self.bytes_copied = 0  # host memory copies into and out of the cache (the runtime reports them per step)
        self._count = threading.Lock()  # reads run on the read lane's threads, keeps on the write lane's

    def _copied(self, nbytes: int) -> None:
        with self._count:
            self.bytes_copied += nbytes

    def _region(self, block: str, kind: str) -> torch.Tensor:
        off = opt_region_offsets(self.store, block)[kind]
        return self.entries[block][off : off + self.store.layouts[block].kinds[kind].file_bytes]

    def read(self, block: str, kind: str, into: torch.Tensor) -> None:
        """The live version of (block, kind) into `into`: a memory copy when the cache holds that
        version, else a store read (which then fills the cache, for the next step)."""
        cached, live = block in self.entries, self.store.version(block, kind)
        if cached and self._versions[block].get(kind) == live:
            n = self.store.kind_nbytes(block, kind)  # the file's content, as a store read gives it (not its padding)
            into[:n].copy_(self._region(block, kind)[:n])
            self.hit_bytes += n
            self._copied(n)
            return
        self.store.read(block, kind, into)
        if cached:
            self._region(block, kind).copy_(into)
            self._copied(into.numel())
            # fp32 weights share the master's bytes (weights_are_master): a fill of one is no longer
            # the other's version (lean mode's journal can make them two versions for a while).
            offsets = opt_region_offsets(self.store, block)
            held = {k: v for k, v in self._versions[block].items() if offsets[k] != offsets[kind]}
            self._versions[block] = {**held, kind: live}

    def keep(self, block: str, slot_bytes: torch.Tensor, version: int) -> None:
        """After a block's new files are written: its optimizer slot becomes the cached copy of
        `version` (used once the step commits, or once the journal makes it live)."""
        if block not in self.entries:
            return
        self._versions[block] = {}  # invalid while the copy is under way
        self.entries[block].copy_(slot_bytes)
        self._copied(slot_bytes.numel())
        self._versions[block] = {k: version for k in SLOT_KINDS if k in self.store.layouts[block].kinds}
