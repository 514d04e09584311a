"""Checkpoints written during a run: `<output-dir>/checkpoint-<step>` every --save-every steps and at
the end — a Hugging Face checkpoint of the committed master weights, or a LoRA run's PEFT adapter —
each complete or absent (made beside its name and renamed), the oldest beyond --save-total-limit
removed."""
from __future__ import annotations

import os
import re
import shutil
from typing import List

from .config import OutputConfig

_NAME = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^checkpoint-\d+\.partial-")


def checkpoint_steps(directory: str) -> List[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(directory) if (m := _NAME.match(n)))


def due(cfg: OutputConfig, step: int, final: bool) -> bool:
    return cfg.dir is not None and (final or (cfg.save_every > 0 and step % cfg.save_every == 0))


def save(trainer, cfg: OutputConfig) -> str:
    """Write the trainer's committed step as a checkpoint (once per step; trainer.save makes it
    whole or not at all), then apply the limit."""
    out = os.path.join(os.path.abspath(cfg.dir), f"checkpoint-{trainer.step_count}")
    if not os.path.isdir(out):
        os.makedirs(cfg.dir, exist_ok=True)
        for name in os.listdir(cfg.dir):  # leftovers of a save that was killed: never complete
            if _PARTIAL.match(name):
                shutil.rmtree(os.path.join(cfg.dir, name), ignore_errors=True)
        trainer.save(out, cfg.export_dtype)
    if cfg.save_total_limit:
        for step in checkpoint_steps(cfg.dir)[: -cfg.save_total_limit]:
            shutil.rmtree(os.path.join(cfg.dir, f"checkpoint-{step}"))
    return out
