"""A LoRA run's own directory: its adapters and their AdamW state, committed with each step.

    manifest.json            the only pointer to live data: the step, the base store it trains on
                             (path, model fingerprint, the checksums of its weights), the run's
                             settings and data position, the live state file and its checksum
    state.<step>.safetensors adapters (peft's names), their exp_avg / exp_avg_sq, the AdamW step
    metrics.jsonl, .fuyou-lock

A commit writes the new state file (fsync), then replaces the manifest (write tmp, fsync, rename,
fsync the directory), then deletes the state it superseded: a crash at any moment leaves the run at
its last committed step. The base store is only read (under a shared lock), so several runs can
train adapters on one base.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import Dict, Optional

import torch

from ..store.manifest import StoreError, fsync_dir

FORMAT = "fuyou-lora-run"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STATE_RE = re.compile(r"^state\.(\d+)\.safetensors$")
_KEYS = {"format", "format_version", "step", "base", "state_file", "state_crc32", "train"}


def is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def base_of(store) -> dict:
    """What the run trains on: the base store and the checksums of its weights (a changed base is refused)."""
    weights = {b["name"]: b.get("crc32", {}).get("weights") for b in store.manifest["blocks"]}
    return {"store": store.root, "fingerprint": store.manifest["model"]["fingerprint"], "weights": weights}


def read(path: str) -> dict:
    """The run's manifest, validated: nothing in it can name a file outside the run directory."""
    where = os.path.join(path, MANIFEST)
    for entry in os.scandir(path):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise StoreError(f"{entry.path} is not a plain file; a fuyou LoRA run directory holds none: remove it, or restore the run")
    try:
        with open(where) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{where} cannot be read ({exc}); the run is damaged") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or set(m) != _KEYS:
        raise StoreError(f"{path} is not a fuyou LoRA run ({MANIFEST} is not one); pass the --run-dir a LoRA run created")
    match = _STATE_RE.match(str(m["state_file"]))
    if m["format_version"] != FORMAT_VERSION or not isinstance(m["step"], int) or not match or int(match.group(1)) != m["step"]:
        raise StoreError(f"{where} is malformed (format version, step or state file); the run is damaged")
    if not isinstance(m["base"], dict) or not isinstance(m["train"], dict) or not isinstance(m["base"].get("store"), str):
        raise StoreError(f"{where} is malformed (base or train entry); the run is damaged")
    return m


def load_state(path: str, manifest: dict) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    file = os.path.join(path, manifest["state_file"])
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise StoreError(f"the run {path} is damaged (missing {manifest['state_file']}); restore it from a backup") from None
    if zlib.crc32(raw) != manifest["state_crc32"]:
        raise StoreError(f"{file} is corrupted (checksum mismatch); restore the run from a backup")
    return load(raw)


def commit(path: str, step: int, tensors: Dict[str, torch.Tensor], base: dict, train: dict, previous: Optional[dict]) -> dict:
    """Make `tensors` the run's state at `step`, atomically; return the new manifest."""
    from safetensors.torch import save

    raw = save(tensors)
    name = f"state.{step}.safetensors"
    tmp = os.path.join(path, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, name))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "base": base, "state_file": name,
                "state_crc32": zlib.crc32(raw), "train": train}
    mtmp = os.path.join(path, MANIFEST + ".tmp")
    with open(mtmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(mtmp, os.path.join(path, MANIFEST))
    fsync_dir(path)
    if previous is not None and previous["state_file"] != name:
        try:
            os.unlink(os.path.join(path, previous["state_file"]))
        except FileNotFoundError:
            pass
    return manifest


def collect_garbage(path: str, manifest: dict) -> None:
    """Delete state files and temporaries of steps that never committed."""
    for name in os.listdir(path):
        if (_STATE_RE.match(name) and name != manifest["state_file"]) or name.endswith(".tmp"):
            os.unlink(os.path.join(path, name))
