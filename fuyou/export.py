"""`fuyou export`: write a Hugging Face checkpoint (config, tokenizer, safetensors shards) from a
store's master weights and stored buffers, one block at a time, so exporting needs one block of
memory.

The checkpoint is assembled in a new `<out>.partial-*` directory beside it and renamed into place
at the end: an interrupted export leaves no directory that looks complete, and nothing else of that
name is touched. The store is locked (one writer or exporter at a time).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional, Sequence

import torch

from .dist.ranks import RANK, store_of
from .faults import crash_point
from .model.convert import to_checkpoint
from .model.skeleton import BUFFERS_FILE, Skeleton
from .optim.state import StateCodecs, decode_master, decode_weights
from .store.directio import aligned_empty
from .store.store import open_store
from .store.lock import StoreLock
from .store.manifest import StoreError, is_store, read_manifest


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_store(store_path: str, out: str, dtype: str = "fp32", on_block: Optional[Callable[[str], None]] = None) -> str:
    """`fuyou export`: lock the store, then write_checkpoint its committed step. A path with
    `{rank}` names the stores of a data-parallel run: every rank's, each block from the store that
    updates it."""
    if RANK in store_path:
        return _export_ranks(store_path, out, dtype, on_block)
    if not is_store(store_path):
        raise StoreError(f"{os.path.abspath(store_path)} is not a fuyou store; pass the directory `fuyou finetune --store` created")
    _check_target(os.path.abspath(out))
    with StoreLock(store_path):
        return write_checkpoint(open_store(store_path, StateCodecs.from_json), out, dtype, on_block)


def _export_ranks(pattern: str, out: str, dtype: str, on_block) -> str:
    first = store_of(pattern, 0)
    if not is_store(first):
        raise StoreError(f"{os.path.abspath(first)} is not a fuyou store; pass the stores of a data-parallel run as `fuyou finetune --store` "
                         f"named them ({RANK} for the rank)")
    ranks = read_manifest(first)["train"].get("run", {}).get("ranks")
    if not ranks:
        raise StoreError(f"{os.path.abspath(first)} is the store of a one-process run; export it by its own path")
    _check_target(os.path.abspath(out))
    paths = [store_of(pattern, r) for r in range(int(ranks["world_size"]))]
    with contextlib.ExitStack() as locks:
        for path in paths:
            locks.enter_context(StoreLock(path))
        stores = [open_store(path, StateCodecs.from_json) for path in paths]
        steps = {s.root: s.step for s in stores}
        if len(set(steps.values())) != 1:
            raise StoreError(f"the ranks' stores are at different steps ({', '.join(f'{p}: {n}' for p, n in steps.items())}): resume the run "
                             "with torchrun (it brings every rank to one step), then export")
        return write_checkpoint(stores[0], out, dtype, on_block, others=stores[1:])


def _check_target(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise StoreError(f"export target {out} exists and is not an empty directory; choose a new directory")


def write_checkpoint(store, out: str, dtype: str = "fp32", on_block: Optional[Callable[[str], None]] = None,
                     deltas: Optional[Dict[str, torch.Tensor]] = None, others: Sequence = ()) -> str:
    """A Hugging Face checkpoint of the open `store`'s committed master weights (a frozen base's:
    its weights) in `dtype`, made in a new directory beside `out` and renamed to it when complete.
    `deltas`: parameter name -> an fp32 tensor added to it first (merged LoRA adapters). `others`:
    the other ranks' stores of a data-parallel run (each block's master from the one holding it)."""
    out = os.path.abspath(out)
    _check_target(out)
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} unknown; choose one of {', '.join(DTYPES)}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint gets a directory's usual mode
    try:
        _write(store, tmp, DTYPES[dtype], on_block, deltas or {}, list(others))
        crash_point("export")  # complete but not yet renamed: a crash here must leave nothing that looks complete
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(store, tmp: str, dtype: torch.dtype, on_block, deltas: Dict[str, torch.Tensor], others: list) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    skeleton = Skeleton(AutoConfig.from_pretrained(store.model_dir()))
    skeleton.load_stored_buffers(store.model_dir())
    stored = skeleton.buffers()
    names = [b for b in store.block_names if store.layouts[b].numel or skeleton.block_buffers.get(b)]
    weight_map, total = {}, 0
    for i, block in enumerate(names):
        tensors = {n: stored[n] for n in skeleton.block_buffers.get(block, [])}
        if store.layouts[block].numel:
            holder = next((s for s in [store] + others if "master" in s.layouts[block].kinds), store)
            tensors.update({n: (t + deltas[n] if n in deltas else t).to(dtype) for n, t in _master_tensors(holder, block).items()})
        # The names and layout save_pretrained writes (per-expert tensors, legacy names), so the
        # export loads in transformers like any checkpoint.
        tensors = {n: t.clone(memory_format=torch.contiguous_format) for n, t in to_checkpoint(skeleton.model, tensors).items()}
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        if on_block is not None:
            on_block(block)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total, "fuyou_step": store.step}, "weight_map": weight_map}, f, indent=1)
    mdir = store.model_dir()
    for fname in os.listdir(mdir):
        src = os.path.join(mdir, fname)
        if os.path.isfile(src) and fname != BUFFERS_FILE:  # the buffers went into the shards
            shutil.copyfile(src, os.path.join(tmp, fname))
    _set_config_dtype(os.path.join(tmp, "config.json"), dtype)


def _set_config_dtype(path: str, dtype: torch.dtype) -> None:
    """The checkpoint's config.json names the dtype its weights are stored in (from_pretrained's default)."""
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _master_tensors(store, block: str) -> dict:
    """The block's exact fp32 master values; a frozen base's store (weights only): its weights."""
    kind = "master" if "master" in store.layouts[block].kinds else "weights"
    lay = store.layouts[block].kinds[kind]
    buf = aligned_empty(lay.file_bytes)
    store.read(block, kind, buf)
    shapes = store.layouts[block].shapes
    decode = (lambda parts, name: decode_master(store.state.cfg, parts, math.prod(shapes[name]))) if kind == "master" else \
        (lambda parts, name: decode_weights(store.state.cfg, parts, shapes[name]).float())
    return {name: decode(parts, name).reshape(shapes[name]).clone() for name, parts in lay.views(buf).items()}
