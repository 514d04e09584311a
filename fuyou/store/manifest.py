"""The manifest of a store: the one JSON file that points at live data, and how it is written.

    {"format": "fuyou-store", "format_version": 2, "checksum": "crc32c", "model": {...},
     "state": {...codecs...}, "step": N, "blocks": [{"name", "params": [{"name", "shape", "numel"}],
     "versions": {kind: v}, "crc32": {kind: checksum}}], "train": {...}}

"checksum" names the algorithm of every per-file value (the "crc32" entries, a 32-bit checksum
whichever it is): store/checksum.py. Version 1 manifests have no "checksum": their values are
zlib's CRC-32. Both versions are read; a store keeps the version (and checksum) it was created
with, so the fuyou that wrote a version-1 store can still open it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Collection, List, Optional

from ..faults import crash_point
from .checksum import CHECKSUMS, LEGACY, default_checksum
from .layout import StateLayout

FORMAT = "fuyou-store"
FORMAT_VERSION = 2  # what new stores are
READ_VERSIONS = (1, 2)  # 1: no "checksum" entry, zlib CRC-32
MANIFEST = "manifest.json"
PREPARED = "manifest.prepared.json"  # a step every rank of a data-parallel run must have durable before any commits it
IMPORTING = ".fuyou-importing"  # present while an import runs; with no manifest, the directory is a dead import


class StoreError(RuntimeError):
    """A store that cannot be used as asked (the message says why and what to do)."""


def fingerprint_config(config_dict: dict) -> str:
    """A stable hash of a model config (architecture and shapes), to refuse foreign stores."""
    keep = {k: v for k, v in sorted(config_dict.items()) if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_manifest(model_info: dict, state: StateLayout, blocks: List[dict], train: Optional[dict] = None,
                 checksum: Optional[str] = None, weights_only: Collection[str] = ()) -> dict:
    """blocks: [{"name", "params": [{"name", "shape", "numel"}]}]; every kind of `state` starts at
    version 0. `train`: what the training loop keeps with each step (the run's settings, its data
    position), from the start. `checksum`: of the files (default: CRC-32C where this fuyou has it).
    `weights_only`: blocks that keep their compute weights alone (another rank's store holds the rest)."""
    def kinds(name: str) -> tuple:
        return ("weights",) if name in weights_only else tuple(state.kinds)

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checksum": checksum or default_checksum(),
        "model": model_info,
        "state": state.to_json(),
        "step": 0,
        "blocks": [dict(b, versions={k: 0 for k in kinds(b["name"])}) for b in blocks],
        "train": dict(train or {}),
    }


def is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def is_dead_import(path: str) -> bool:
    """An import that was interrupted before its manifest: safe to delete and redo."""
    return os.path.isfile(os.path.join(path, IMPORTING)) and not is_store(path)


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path} is not a fuyou store (no {MANIFEST}); pass the directory `fuyou finetune --store` created") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{mpath} cannot be read ({exc}); the store is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a fuyou store ({MANIFEST} has no fuyou-store format); pass the directory `fuyou finetune --store` created")
    if manifest.get("format_version") not in READ_VERSIONS:
        raise StoreError(f"{path}: store format version {manifest.get('format_version')} is not supported by this fuyou "
                         f"(it reads {', '.join(map(str, READ_VERSIONS))})")
    validate_manifest(manifest, mpath)
    return manifest


def read_prepared(path: str) -> Optional[dict]:
    """The manifest a data-parallel step prepared but has not committed yet (store/prepared.py), or
    None; a torn or malformed one is None too (it was never durable, so no rank committed from it)."""
    ppath = os.path.join(path, PREPARED)
    try:
        with open(ppath) as f:
            prepared = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(prepared, dict) or prepared.get("format") != FORMAT or _manifest_problem(prepared):
        return None
    return prepared


def manifest_checksum(manifest: dict) -> str:
    """The checksum a (validated) manifest's per-file values are."""
    return manifest.get("checksum", LEGACY)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: str, manifest: dict, name: str = MANIFEST) -> None:
    """Replace root's manifest (or the prepared one) atomically: write a temporary file, fsync,
    rename over, fsync the directory."""
    tmp = os.path.join(root, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    crash_point("commit" if name == MANIFEST else "prepare")
    os.replace(tmp, os.path.join(root, name))
    fsync_dir(root)
    crash_point("committed" if name == MANIFEST else "prepared")


# What a manifest may hold. Names end up in file names: a fixed pattern, so no manifest can point a
# read, write or delete outside the store's directories.
NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MAX_PARAM_NUMEL = 1 << 40  # 4 TiB of fp32 for one tensor: beyond any model; larger is a corrupt manifest
_TOP_KEYS = {"format", "format_version", "model", "state", "step", "blocks", "train"}
_TOP_KEYS_BY_VERSION = {1: _TOP_KEYS, 2: _TOP_KEYS | {"checksum"}}
_BLOCK_KEYS, _BLOCK_REQUIRED = {"name", "params", "versions", "crc32"}, {"name", "params", "versions"}
_PARAM_KEYS = {"name", "shape", "numel"}


def _is_int(v, low: int = 0, high: Optional[int] = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def validate_manifest(m: dict, where: str) -> None:
    """Refuse a manifest whose structure, names or numbers are not what a store writes (one line)."""
    problem = _manifest_problem(m)
    if problem:
        raise StoreError(f"{where} is malformed ({problem}); the store is damaged: restore it from a backup or re-import the model")


def _manifest_problem(m: dict) -> Optional[str]:
    keys = _TOP_KEYS_BY_VERSION.get(m.get("format_version"), _TOP_KEYS)
    if set(m) != keys:
        return f"keys {sorted(set(m) ^ keys)} unexpected or missing"
    if "checksum" in m and m["checksum"] not in CHECKSUMS:
        return f"checksum {m['checksum']!r} is not one of {', '.join(CHECKSUMS)}"
    if not _is_int(m["step"]):
        return f"step {m['step']!r} is not a step number"
    model = m["model"]
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("source", "fingerprint")) or not all(
            isinstance(v, (str, int)) for v in model.values()):
        return "the model entry is not {source, fingerprint, ...} of names and numbers"
    if not isinstance(m["state"], dict) or not isinstance(m["train"], dict):
        return "state and train must be objects"
    if not isinstance(m["blocks"], list) or not m["blocks"]:
        return "blocks must be a list of blocks"
    names = set()
    for b in m["blocks"]:
        problem = _block_problem(b, m["step"])
        if problem:
            return problem
        if b["name"] in names:
            return f"block {b['name']} appears twice"
        names.add(b["name"])
    return None


def _block_problem(b, step: int) -> Optional[str]:
    if not isinstance(b, dict) or not _BLOCK_REQUIRED <= set(b) <= _BLOCK_KEYS:
        return "a block entry is not {name, params, versions[, crc32]}"
    if not isinstance(b["name"], str) or not NAME_RE.match(b["name"]):
        return f"block name {b['name']!r} is not letters, digits and '_'"
    if not isinstance(b["params"], list):
        return f"block {b['name']}: params is not a list"
    for p in b["params"]:
        if not isinstance(p, dict) or set(p) != _PARAM_KEYS or not isinstance(p["name"], str) or not 0 < len(p["name"]) <= 512:
            return f"block {b['name']}: a parameter entry is not {{name, shape, numel}}"
        shape = p["shape"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d, 1) for d in shape):
            return f"parameter {p['name']}: shape {shape!r} is not a list of sizes"
        if not _is_int(p["numel"], 1, MAX_PARAM_NUMEL) or p["numel"] != math.prod(shape):
            return f"parameter {p['name']}: numel {p['numel']!r} does not match its shape {shape}"
    if not isinstance(b["versions"], dict) or not all(NAME_RE.match(str(k)) and _is_int(v, 0, step + 1) for k, v in b["versions"].items()):
        return f"block {b['name']}: versions {b['versions']!r} are not step numbers of the store's kinds"
    crcs = b.get("crc32", {})
    if not isinstance(crcs, dict) or not all(k in b["versions"] and (v is None or _is_int(v, 0, 0xFFFFFFFF)) for k, v in crcs.items()):
        return f"block {b['name']}: crc32 {crcs!r} is not a checksum per kind"
    return None
