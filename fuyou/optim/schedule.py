"""The learning rate of every optimizer step, with the semantics of transformers' `get_scheduler`
(the schedules Hugging Face `Trainer` users know), computed from its own schedule functions.

`get_scheduler` returns a LambdaLR whose factor at scheduler step s the Trainer applies to the
optimizer step that follows s scheduler steps: optimizer step t (counting from 1) runs at
lr * factor(t - 1). With warm-up the first step's factor is 0, as in Trainer.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..config import OptimConfig

# Schedules whose factor needs the run's length.
_NEEDS_TOTAL = ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr")


def warmup_steps(cfg: OptimConfig, total_steps: Optional[int]) -> int:
    """--warmup-steps, or --warmup-ratio of the run's steps rounded up (as Trainer does)."""
    if cfg.warmup_ratio:
        if total_steps is None:
            raise ValueError("--warmup-ratio needs the run's total steps; pass --warmup-steps instead")
        return math.ceil(cfg.warmup_ratio * total_steps)
    return cfg.warmup_steps


def lr_schedule(cfg: OptimConfig, total_steps: Optional[int] = None) -> Callable[[int], float]:
    """lr_at(step) for optimizer steps 1, 2, ...; `total_steps` is the run's target step."""
    from transformers import get_scheduler

    if cfg.lr is None:
        raise ValueError("the learning rate is unset; pass OptimConfig(lr=...) or call with_default_lr first")
    name, warmup = cfg.lr_scheduler, warmup_steps(cfg, total_steps)
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # warm-up asked for: the constant schedule that has it
    if name in _NEEDS_TOTAL and total_steps is None:
        raise ValueError(f"--lr-scheduler {name} needs the run's total steps")
    kwargs = {"min_lr_rate": cfg.min_lr_rate} if name == "cosine_with_min_lr" else None
    # At the run's lr: some factors depend on it (polynomial decays towards an absolute end lr).
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    factor = get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=kwargs).lr_lambdas[0]
    lr = cfg.lr
    return lambda step: lr * factor(step - 1)
