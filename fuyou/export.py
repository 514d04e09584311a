"""`fuyou export`: write a Hugging Face checkpoint (config, tokenizer, safetensors shards) from a
store's master weights and stored buffers, one block at a time, so exporting needs one block of
memory.

The checkpoint is assembled in `<out>.partial` and renamed into place at the end: an interrupted
export leaves no directory that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

import torch

from .model.convert import to_checkpoint
from .model.skeleton import BUFFERS_FILE, Skeleton
from .optim.state import decode_master
from .store.directio import aligned_empty
from .store.store import StoreError, open_store


def export_store(store_path: str, out: str, on_block: Optional[Callable[[str], None]] = None) -> str:
    store = open_store(store_path)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise StoreError(f"export target {out} exists and is not an empty directory; choose a new directory")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write(store, tmp, on_block)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(store, tmp: str, on_block) -> None:
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
            tensors.update(_master_tensors(store, block))
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


def _master_tensors(store, block: str) -> dict:
    lay = store.layouts[block].kinds["master"]
    buf = aligned_empty(lay.file_bytes)
    store.read(block, "master", buf)
    shapes = {p["name"]: p["shape"] for b in store.manifest["blocks"] if b["name"] == block for p in b["params"]}
    return {name: decode_master(store.state_cfg, parts).reshape(shapes[name]).clone() for name, parts in lay.views(buf).items()}
