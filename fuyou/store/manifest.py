"""The manifest of a store: the one JSON file that points at live data, and how it is written.

    {"format": "fuyou-store", "format_version": 1, "model": {...}, "state": {...codecs...},
     "step": N, "blocks": [{"name", "params": [{"name", "shape", "numel"}], "versions": {kind: v},
     "crc32": {kind: crc}}], "train": {...}}
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List

from ..faults import crash_point
from .layout import StateLayout

FORMAT = "fuyou-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMPORTING = ".fuyou-importing"  # present while an import runs; with no manifest, the directory is a dead import


class StoreError(RuntimeError):
    """A store that cannot be used as asked (the message says why and what to do)."""


def fingerprint_config(config_dict: dict) -> str:
    """A stable hash of a model config (architecture and shapes), to refuse foreign stores."""
    keep = {k: v for k, v in sorted(config_dict.items()) if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_manifest(model_info: dict, state: StateLayout, blocks: List[dict]) -> dict:
    """blocks: [{"name", "params": [{"name", "shape", "numel"}]}]; every kind of `state` starts at version 0."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_info,
        "state": state.to_json(),
        "step": 0,
        "blocks": [dict(b, versions={k: 0 for k in state.kinds}) for b in blocks],
        "train": {},
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
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a fuyou store ({MANIFEST} has format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {manifest.get('format_version')} is not supported by this fuyou (expects {FORMAT_VERSION})")
    return manifest


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: str, manifest: dict) -> None:
    """Replace root's manifest atomically: write a temporary file, fsync, rename over, fsync the directory."""
    tmp = os.path.join(root, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    crash_point("commit")
    os.replace(tmp, os.path.join(root, MANIFEST))
    fsync_dir(root)
    crash_point("committed")
