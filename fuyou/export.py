"""`fuyou export`: write a Hugging Face checkpoint (config, tokenizer, safetensors shards) from a
store's master weights, one block at a time, so exporting needs one block of memory.

The checkpoint is assembled in `<out>.partial` and renamed into place at the end: an interrupted
export leaves no directory that looks complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from typing import Callable, Optional

from .optim.state import StateCodecs, decode_master
from .store.directio import aligned_empty
from .store.store import open_store
from .store.manifest import StoreError


def export_store(store_path: str, out: str, on_block: Optional[Callable[[str], None]] = None) -> str:
    store = open_store(store_path, StateCodecs.from_json)
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

    names = [b for b in store.block_names if store.layouts[b].numel]
    weight_map, total = {}, 0
    for i, block in enumerate(names):
        lay = store.layouts[block].kinds["master"]
        buf = aligned_empty(lay.file_bytes)
        store.read(block, "master", buf)
        shapes = store.layouts[block].shapes
        tensors = {name: decode_master(store.state.cfg, parts, math.prod(shapes[name])).reshape(shapes[name]).clone()
                   for name, parts in lay.views(buf).items()}
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
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(tmp, fname))
