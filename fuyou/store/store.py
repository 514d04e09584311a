"""The block store: the whole training state of a model as per-block files on SSD plus a manifest.

Layout of a store directory:

    manifest.json               the only pointer to live data (atomically replaced at each commit)
    model/                      config.json, tokenizer files (copied at import)
    blocks/<block>.<kind>.<version>.bin

One file per (block, kind) holds every parameter of the block in that kind's codec, each part at a
256-byte-aligned offset, the file padded to 4 KiB. A step writes each updated file as a *new*
version (the step number) and never overwrites a live one; `commit` fsyncs, then replaces the
manifest (write tmp, fsync, rename, fsync dir), then deletes the versions it superseded (on a
thread of its own: deleter.py; the next new file waits for that). A crash at
any moment leaves the manifest pointing at a complete, consistent step; files of an uncommitted step
are garbage, removed when the store is next opened. Peak disk use is therefore up to twice the
state (old and new versions of every block until the commit).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from typing import Callable, Dict, List, Optional

import torch

from ..faults import crash_point
from .checksum import checksum_fn
from .deleter import Deleter
from .directio import DirectFile
from .layout import BlockLayout, StateLayout
from .paths import check_confined, check_store_target
from .manifest import IMPORTING, MANIFEST, PREPARED, StoreError, fsync_dir, is_dead_import, manifest_checksum, read_manifest, read_prepared, write_manifest

GRAD = "grad"  # the store's own kind: a block's fp32 gradient, kept across a clipped step's redo
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")  # a kind names files: no '/', no '..', no '.' (the separator in them)


# Reads are issued as pieces of this size, all at once; the checksum of each piece is computed
# while the later ones are still in flight, so verification costs no time beyond the I/O's.
READ_PIECE_BYTES = 16 << 20


class Store:
    """An open store. Use `create_store` / `open_store`.

    `state` is the caller's layout of the state (the manifest's "state" entry is its JSON): its kinds
    name the block files, its parts fill them.
    """

    def __init__(self, root: str, manifest: dict, state: StateLayout, backend=None):
        self.root = os.path.abspath(root)
        self.manifest = manifest
        self.backend = backend
        self.state = state
        self.kinds = tuple(state.kinds)
        if not all(_NAME_RE.match(k) for k in self.kinds) or GRAD in self.kinds:
            raise ValueError(f"state kinds {self.kinds}: each must be letters, digits and '_', and {GRAD!r} is the store's own")
        self._file_re = re.compile(rf"^[A-Za-z0-9_]+\.({'|'.join(self.kinds + (GRAD,))})\.[0-9]+\.bin$")
        self.layouts: Dict[str, BlockLayout] = {}
        for b in manifest["blocks"]:
            # Every kind, or (a data-parallel rank's store) the weights alone of a block another rank updates.
            if set(b["versions"]) != set(self.kinds) and not (set(b["versions"]) == {"weights"} and "weights" in self.kinds):
                raise StoreError(f"{self.root}/{MANIFEST}: block {b['name']} has versions of {sorted(b['versions'])}, not of the store's kinds "
                                 f"{sorted(self.kinds)}; the store is damaged")
            kinds = [k for k in self.kinds if k in b["versions"]]
            self.layouts[b["name"]] = BlockLayout(b["name"], [(p["name"], p["numel"], tuple(p["shape"])) for p in b["params"]], state, kinds)
        self.checksum = manifest_checksum(manifest)
        try:
            self._sum = checksum_fn(self.checksum)
        except ValueError as exc:
            raise StoreError(f"{self.root}: {exc}") from None
        self._lock = threading.Lock()
        self._deleter = Deleter()  # superseded files, deleted off the step (settle() waits for them)
        self.bytes_read = 0
        self.bytes_written = 0
        self.importing = False  # create_store sets it: version-0 files may then be written
        # Kinds whose reads skip the checksum against the manifest; every other read is checked.
        self.unverified: frozenset = frozenset()
        self._pending_crc: Dict[tuple, int] = {}  # (block, kind, version) -> crc of a written file
        # Lean disk mode: blocks whose new master/moments became live ahead of the manifest.
        self.journal: Dict[str, dict] = self._load_journal()
        # A data-parallel step durable here, waiting for every rank's (store/prepared.py); its files are live.
        self.prepared: Optional[dict] = read_prepared(self.root)

    # -- paths -------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def block_names(self) -> List[str]:
        return [b["name"] for b in self.manifest["blocks"]]

    def _block_entry(self, block: str) -> dict:
        for b in self.manifest["blocks"]:
            if b["name"] == block:
                return b
        raise KeyError(f"store {self.root} has no block {block!r}")

    def version(self, block: str, kind: str) -> int:
        """The version a read sees: the manifest's, or for master/moments the journal's (lean mode)."""
        j = self.journal.get(block)
        if j is not None and kind in j["versions"] and kind != "weights":
            return int(j["versions"][kind])
        return int(self._block_entry(block)["versions"][kind])

    def _safe_path(self, rel: str) -> str:
        """Resolve a manifest-relative path, refusing anything outside the store."""
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise StoreError(f"{self.root}/{MANIFEST}: refusing path {rel!r} outside the store; the manifest is corrupt")
        return os.path.join(self.root, rel)

    def file_path(self, block: str, kind: str, version: int) -> str:
        return self._safe_path(f"blocks/{block}.{kind}.{version}.bin")

    def model_dir(self) -> str:
        return os.path.join(self.root, "model")

    # -- I/O -----------------------------------------------------------------------------------
    def kind_nbytes(self, block: str, kind: str) -> int:
        """Bytes of a (block, kind) file's content; kind "grad" is the block's fp32 gradient."""
        if kind == GRAD:
            return self.layouts[block].numel * 4
        return self.layouts[block].kinds[kind].nbytes

    def read(self, block: str, kind: str, into: torch.Tensor, version: Optional[int] = None) -> int:
        """Read the live (or given) version of (block, kind) into `into`, verifying its checksum;
        returns the bytes read (the read is complete)."""
        nbytes = self.kind_nbytes(block, kind)
        v = self.version(block, kind) if version is None else version
        path = self.file_path(block, kind, v)
        crash_point("read")
        want = self._crc_of(block, kind, v)
        check = want is not None and kind not in self.unverified
        crc = 0
        if not os.path.isfile(path):
            raise StoreError(f"the store {self.root} is damaged (missing {os.path.relpath(path, self.root)}); restore it from a backup or "
                             "re-import the model")
        with DirectFile(path, "r", self.backend) as f:
            pieces = [(off, min(READ_PIECE_BYTES, nbytes - off)) for off in range(0, nbytes, READ_PIECE_BYTES)]
            futs = [f.pread(into[off:], size=n, file_offset=off) for off, n in pieces]
            # DirectFile closes its fd on exit, so wait here: the caller runs this on an I/O lane.
            try:
                for (off, n), fut in zip(pieces, futs):
                    fut.get()
                    if check:
                        crc = self._sum(into[off:], n, crc)
            except BaseException:  # a failed piece: the others still finish before the fd closes and `into` is given back
                for fut in futs:
                    try:
                        fut.get()
                    except BaseException:  # noqa: BLE001 - the first error is already on its way up
                        pass
                raise
        if check and crc != want:
            raise StoreError(f"{path} is corrupted (checksum mismatch); restore the store from a backup or re-import the model")
        with self._lock:
            self.bytes_read += nbytes
        return nbytes

    def write(self, block: str, kind: str, data: torch.Tensor, version: int) -> str:
        """Write (block, kind) as a new version file and fsync it; the manifest is not touched."""
        nbytes = self.kind_nbytes(block, kind)
        if kind != GRAD and version <= self.version(block, kind) and not self.importing:
            raise StoreError(f"refusing to overwrite live version {self.version(block, kind)} of {block}.{kind}")
        path = self.file_path(block, kind, version)
        self.settle()  # the last commit's superseded files are gone before a new one takes their room
        crash_point("write")
        with DirectFile(path, "w", self.backend) as f:
            fut = f.pwrite(data, size=nbytes)
            crc = self._sum(data, nbytes, 0)  # while the write is in flight (the data does not change)
            fut.get()
            f.fsync()
        with self._lock:
            self.bytes_written += nbytes
            self._pending_crc[(block, kind, version)] = crc
        return path

    def _crc_of(self, block: str, kind: str, version: int) -> Optional[int]:
        with self._lock:
            if (block, kind, version) in self._pending_crc:
                return self._pending_crc[(block, kind, version)]
        j = self.journal.get(block)
        if j is not None and j["versions"].get(kind) == version:
            return j.get("crc32", {}).get(kind)
        entry = self._block_entry(block)
        if entry["versions"].get(kind) == version:
            return entry.get("crc32", {}).get(kind)
        return None

    def discard(self, version: int, kinds=None) -> None:
        """Delete files written as `version` that no committed manifest points at (none of them is
        the deleter's: it deletes versions a commit superseded)."""
        live = self._live_files()
        for b in self.block_names:
            for kind in kinds or (self.kinds + (GRAD,)):
                path = self.file_path(b, kind, version)
                if os.path.basename(path) not in live and os.path.exists(path):
                    os.unlink(path)
                self._pending_crc.pop((b, kind, version), None)

    def commit(self, step: int, versions: Dict[str, Dict[str, int]], train_meta: Optional[dict] = None) -> None:
        """Atomically make `versions` ({block: {kind: version}}) and `step` the live state."""
        self.install(self.next_manifest(step, versions, train_meta))

    def next_manifest(self, step: int, versions: Dict[str, Dict[str, int]], train_meta: Optional[dict] = None) -> dict:
        """The manifest that makes `versions` and `step` live (with the written files' checksums)."""
        new = json.loads(json.dumps(self.manifest))
        for b in new["blocks"]:
            for kind, v in versions.get(b["name"], {}).items():
                old = b["versions"][kind]
                crc = self._crc_of(b["name"], kind, v)
                self._pending_crc.pop((b["name"], kind, v), None)
                b["versions"][kind] = v
                if crc is not None:
                    b.setdefault("crc32", {})[kind] = crc
                elif old != v:
                    b.get("crc32", {}).pop(kind, None)
        new["step"] = int(step)
        if train_meta is not None:
            new["train"] = train_meta
        return new

    def install(self, new: dict) -> None:
        """Replace the manifest with `new` (atomically), then delete the files it no longer points at."""
        after = {b["name"]: b["versions"] for b in new["blocks"]}
        superseded = [self.file_path(b["name"], kind, v) for b in self.manifest["blocks"] for kind, v in b["versions"].items()
                      if after.get(b["name"], {}).get(kind) != v]
        write_manifest(self.root, new)
        self.manifest = new
        self._clear_journal()
        self._deleter.submit(superseded)

    def settle(self) -> None:
        """Wait until the files the last commits superseded are deleted."""
        self._deleter.settle()

    def collect_garbage(self) -> int:
        """Delete block files the manifest does not point at (left by a step that never committed)."""
        self.settle()
        live = self._live_files()
        removed = 0
        bdir = os.path.join(self.root, "blocks")
        for name in os.listdir(bdir):
            if name not in live and self._file_re.match(name):
                try:
                    os.unlink(os.path.join(bdir, name))
                    removed += 1
                except FileNotFoundError:  # another Store of this directory deleted it (its deleter thread)
                    pass
        for name in (MANIFEST, PREPARED):
            tmp = os.path.join(self.root, name + ".tmp")
            if os.path.exists(tmp):
                os.unlink(tmp)
        jdir = self._journal_dir()
        if os.path.isdir(jdir):
            for name in os.listdir(jdir):  # torn, stale (their step was committed) or foreign entries
                if name[: -len(".json")] not in self.journal or not name.endswith(".json"):
                    os.unlink(os.path.join(jdir, name))
        return removed

    def _live_files(self) -> set:
        manifests = [self.manifest] + ([self.prepared] if self.prepared is not None else [])
        live = {f"{b['name']}.{k}.{v}.bin" for m in manifests for b in m["blocks"] for k, v in b["versions"].items()}
        live |= {f"{b}.{k}.{v}.bin" for b, j in self.journal.items() for k, v in j["versions"].items()}
        return live

    # -- lean disk mode: per-block journal ---------------------------------------------------------
    def _journal_dir(self) -> str:
        return os.path.join(self.root, "journal")

    def _load_journal(self) -> Dict[str, dict]:
        """Journal entries of the step after the manifest's (older ones are stale and dropped)."""
        out: Dict[str, dict] = {}
        jdir = self._journal_dir()
        if not os.path.isdir(jdir):
            return out
        for name in os.listdir(jdir):
            path = os.path.join(jdir, name)
            block = name[: -len(".json")] if name.endswith(".json") else None
            entry = None
            if block in self.layouts:
                try:
                    with open(path) as f:
                        entry = json.load(f)
                except (OSError, json.JSONDecodeError):
                    entry = None
            if self._journal_entry_ok(entry):
                out[block] = entry
        return out

    def _journal_entry_ok(self, entry) -> bool:
        """A journal entry of the step after the manifest's, naming the store's kinds (anything else
        is stale, torn or foreign, and is dropped)."""
        if not isinstance(entry, dict) or entry.get("step") != self.step + 1 or not isinstance(entry.get("versions"), dict):
            return False
        return all(k in self.kinds and v == self.step + 1 for k, v in entry["versions"].items()) and isinstance(entry.get("crc32", {}), dict)

    def commit_block(self, block: str, step: int, kinds) -> None:
        """Lean mode: make block's new master/moments live now (journal entry, atomically), then
        delete their old versions (the deleter's thread; the next write waits for it). Its old
        weights stay until the step commits: a resumed step recomputes its forward and backward
        from them."""
        os.makedirs(self._journal_dir(), exist_ok=True)
        entry = {"step": step, "versions": {k: step for k in kinds}, "crc32": {k: self._crc_of(block, k, step) for k in kinds}}
        tmp = os.path.join(self._journal_dir(), f"{block}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("journal")
        os.replace(tmp, os.path.join(self._journal_dir(), f"{block}.json"))
        fsync_dir(self._journal_dir())
        old = {k: int(self._block_entry(block)["versions"][k]) for k in kinds if k != "weights"}
        with self._lock:
            self.journal[block] = entry
        self._deleter.submit(self.file_path(block, k, v) for k, v in old.items() if v != step)

    def _clear_journal(self) -> None:
        jdir = self._journal_dir()
        for block in list(self.journal):
            try:
                os.unlink(os.path.join(jdir, f"{block}.json"))
            except FileNotFoundError:
                pass
        self.journal.clear()

    def check_files(self) -> None:
        """Every live file exists with the size its layout gives (the store is damaged otherwise)."""
        for b in self.block_names:
            for kind in self.layouts[b].kinds:
                path = self.file_path(b, kind, self.version(b, kind))
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:
                    raise StoreError(f"the store {self.root} is damaged (missing {os.path.relpath(path, self.root)}); restore it from a backup "
                                     "or re-import the model") from None
                if size != self.layouts[b].kinds[kind].file_bytes:
                    raise StoreError(f"the store {self.root} is damaged ({os.path.relpath(path, self.root)} has {size} bytes, its layout "
                                     f"{self.layouts[b].kinds[kind].file_bytes}); restore it from a backup or re-import the model")

    # -- accounting ----------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of live state on disk (one version of everything)."""
        return sum(kl.file_bytes for lay in self.layouts.values() for kl in lay.kinds.values())

    def numel(self) -> int:
        return sum(lay.numel for lay in self.layouts.values())


def open_store(path: str, state_from_json: Callable[[dict], StateLayout], backend=None) -> Store:
    """Open an existing store and remove leftovers of any step that never committed.

    `state_from_json` builds the caller's state layout from the manifest's "state" entry. Refused,
    with nothing touched: symlinks inside the store, a malformed manifest, missing or truncated
    live files."""
    check_confined(path)
    manifest = read_manifest(path)
    try:
        state = state_from_json(manifest["state"])
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}/{MANIFEST}: its state entry {manifest['state']!r} names no codecs this fuyou has ({exc}); the store is damaged") from None
    store = Store(path, manifest, state, backend)
    store.check_files()
    store.collect_garbage()
    return store


def create_store(path: str, manifest: dict, state: StateLayout, backend=None) -> Store:
    """Create the directory structure for `manifest` (from `new_manifest(..., state, ...)`); the
    manifest is written last, by `finalize_import`."""
    check_store_target(path)
    if is_dead_import(path):
        for sub in ("blocks", "model"):
            shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, IMPORTING), "w"):
        pass
    os.makedirs(os.path.join(path, "blocks"), exist_ok=True)
    os.makedirs(os.path.join(path, "model"), exist_ok=True)
    store = Store(path, manifest, state, backend)
    store.importing = True
    return store


def finalize_import(store: Store) -> None:
    """Write the first manifest: until then the directory is not a store and is safe to delete."""
    for b in store.manifest["blocks"]:
        b["crc32"] = {k: store._pending_crc.pop((b["name"], k, 0)) for k in store.kinds if (b["name"], k, 0) in store._pending_crc}
    write_manifest(store.root, store.manifest)
    os.unlink(os.path.join(store.root, IMPORTING))
    store.importing = False

