"""AdamW math: the one stateless update every optimizer path (torch, fused C++) must reproduce.

The operation order follows torch.optim.AdamW's single-tensor implementation, so that fuyou in fp32
mode matches plain PyTorch training to the last few ulps.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One AdamW update in place on fp32 `param`, `exp_avg`, `exp_avg_sq` (step counts from 1)."""
    if step < 1:
        raise ValueError(f"AdamW step counts from 1, got {step}")
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
