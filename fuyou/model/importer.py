"""Import a model into a new store, one block at a time.

Each block's parameters come from the checkpoint (streamed tensor by tensor with plain reads, no
memory map) or, for a preset, from the architecture's own initialisation run on that block alone.
They are encoded into every kind of state and written as version-0 files; the buffers the checkpoint
stores go, unchanged, into one file beside the config. The manifest is written last, so an interrupted import leaves no store behind (the directory is removed). Peak memory is one
block's tensors plus its four encoded files.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Collection, Dict, Optional

import torch

from ..config import StateConfig
from ..optim.state import StateCodecs, init_state_, init_weights_
from ..store.directio import aligned_empty
from ..store.store import Store, create_store, finalize_import
from ..store.manifest import IMPORTING, fingerprint_config, new_manifest
from .skeleton import BUFFERS_FILE, Skeleton
from .source import ModelSource

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def model_info(source: ModelSource, skeleton: Skeleton) -> dict:
    return {
        "source": source.describe(),
        "architecture": type(skeleton.model).__name__,
        "fingerprint": fingerprint_config(source.config.to_dict()),
        "numel": skeleton.numel(),
    }


def _block_values_from_init(skeleton: Skeleton, block, seed: int) -> Dict[str, torch.Tensor]:
    """Materialize one block on CPU and run the architecture's own weight init on it."""
    tensors = {name: torch.empty(skeleton.params[name].shape, dtype=torch.float32) for name in block.params}
    params = skeleton.attach(tensors, requires_grad=False)
    ids = {id(p) for p in params.values()}
    torch.manual_seed(seed * 7919 + block.index)
    with torch.no_grad():
        for module in skeleton.model.modules():
            if any(id(p) in ids for p in module.parameters(recurse=False)):
                skeleton.model._init_weights(module)
    skeleton.detach(block.params)
    return {name: params[name].data for name in block.params}


def import_model(
    source: ModelSource,
    store_path: str,
    state_cfg: StateConfig,
    *,
    seed: int = 0,
    backend=None,
    on_block: Optional[Callable[[str, int], None]] = None,
    train: Optional[dict] = None,
    weights_only: bool = False,
    weights_only_blocks: Collection[str] = (),
) -> Store:
    """Create a store at `store_path` holding `source`'s weights in `state_cfg`'s codecs; `train`:
    the manifest's training entry from the start (the run's settings). `weights_only`: a frozen
    base (LoRA) keeps its compute weights alone; `weights_only_blocks`: these blocks do (a
    data-parallel rank's store: another rank's holds their master and moments)."""
    skeleton = Skeleton(source.config)
    if source.preset is None:
        source.bind(skeleton.model)
    state = StateCodecs(state_cfg, weights_only=weights_only)
    manifest = new_manifest(model_info(source, skeleton), state, skeleton.manifest_blocks(), train, weights_only=weights_only_blocks)
    existed = os.path.exists(store_path)
    store = create_store(store_path, manifest, state, backend)
    try:
        _copy_model_files(source, store)
        buffers: Dict[str, torch.Tensor] = {}
        for block in skeleton.blocks:
            stored = skeleton.block_buffers[block.name]
            if source.preset is not None:
                values = _block_values_from_init(skeleton, block, seed)
                buffers.update({n: skeleton.model.get_buffer(n) for n in stored})
            else:
                values = source.block_tensors(block.params + stored)
                buffers.update({n: values.pop(n) for n in stored})
            _write_block(store, block.name, values)
            if on_block is not None:
                on_block(block.name, sum(v.numel() for v in values.values()))
            del values
        _write_buffers(store, buffers)
        finalize_import(store)
    except BaseException:
        # Nothing half-written: without a manifest the directory is not a store; remove what we made.
        if existed:
            for sub in ("blocks", "model"):
                shutil.rmtree(os.path.join(store_path, sub), ignore_errors=True)
            marker = os.path.join(store_path, IMPORTING)
            if os.path.exists(marker):
                os.unlink(marker)
        else:
            shutil.rmtree(store_path, ignore_errors=True)
        raise
    return store


def _write_block(store: Store, block: str, values: Dict[str, torch.Tensor]) -> None:
    layout = store.layouts[block]
    bufs = {kind: aligned_empty(kl.file_bytes).zero_() for kind, kl in layout.kinds.items()}  # zero padding: files are deterministic
    views = {kind: layout.kinds[kind].views(bufs[kind]) for kind in layout.kinds}
    for name, _numel in layout.params:
        parts = {kind: views[kind][name] for kind in layout.kinds}
        if list(layout.kinds) == ["weights"]:
            init_weights_(store.state.cfg, values[name], parts["weights"])
        else:
            init_state_(store.state.cfg, values[name], parts)
    for kind in layout.kinds:
        store.write(block, kind, bufs[kind], version=0)


def _write_buffers(store: Store, buffers: Dict[str, torch.Tensor]) -> None:
    """The checkpoint's buffers (e.g. DeepSeek-V3's e_score_correction_bias) beside the config:
    not trained, loaded into the skeleton by the runtime and written back by the export."""
    if buffers:
        from safetensors.torch import save_file

        save_file({n: t.detach().contiguous() for n, t in buffers.items()}, os.path.join(store.model_dir(), BUFFERS_FILE))


def _copy_model_files(source: ModelSource, store: Store) -> None:
    mdir = store.model_dir()
    source.config.save_pretrained(mdir)
    if source.tokenizer_dir:
        for fname in TOKENIZER_FILES:
            src = os.path.join(source.tokenizer_dir, fname)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(mdir, fname))
