"""Hugging Face checkpoints written during a run: `<output-dir>/checkpoint-<step>` from the committed
master weights every --save-every steps and at the end, each complete or absent (made beside its
name and renamed), the oldest beyond --save-total-limit removed."""
from __future__ import annotations

import os
import re
import shutil
from typing import List

from .config import OutputConfig
from .export import write_checkpoint

_NAME = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^checkpoint-\d+\.partial-")


def checkpoint_steps(directory: str) -> List[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(directory) if (m := _NAME.match(n)))


def due(cfg: OutputConfig, step: int, final: bool) -> bool:
    return cfg.dir is not None and (final or (cfg.save_every > 0 and step % cfg.save_every == 0))


def save(store, cfg: OutputConfig) -> str:
    """Write the store's committed step as a checkpoint (once per step), then apply the limit."""
    out = os.path.join(os.path.abspath(cfg.dir), f"checkpoint-{store.step}")
    if not os.path.isdir(out):
        os.makedirs(cfg.dir, exist_ok=True)
        for name in os.listdir(cfg.dir):  # leftovers of a save that was killed: never complete
            if _PARTIAL.match(name):
                shutil.rmtree(os.path.join(cfg.dir, name), ignore_errors=True)
        write_checkpoint(store, out, cfg.export_dtype)
    if cfg.save_total_limit:
        for step in checkpoint_steps(cfg.dir)[: -cfg.save_total_limit]:
            shutil.rmtree(os.path.join(cfg.dir, f"checkpoint-{step}"))
    return out
