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
    exact_sqrt: bool = False,
) -> None:
    """One AdamW update in place on fp32 `param`, `exp_avg`, `exp_avg_sq` (step counts from 1).

    torch's CPU sqrt of a large fp32 tensor goes through MKL VML, which is within 1 ulp but not
    correctly rounded (about 20% of results differ from IEEE sqrt on this machine, and the result
    depends on the CPU). `exact_sqrt=True` takes the correctly rounded sqrt (fp64 sqrt rounded once
    to fp32), which the fused C++ kernel uses: then the two agree bit for bit on every CPU.
    """
    if step < 1:
        raise ValueError(f"AdamW step counts from 1, got {step}")
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    root = exp_avg_sq.double().sqrt().float() if exact_sqrt else exp_avg_sq.sqrt()
    denom = (root / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
