"""Per-parameter training state as the store keeps it, and the optimizer update over it.

Each parameter has four kinds of state: `weights` (the compute copy streamed to the device),
`master` (the exact value the optimizer updates), `exp_avg` and `exp_avg_sq` (AdamW moments). Each
kind is stored in a codec as one or more flat *parts* (e.g. fp8 codes + fp32 scales). The store
lays the parts out in the block's files; the runtime hands this module flat tensor views of them.

    layout = state_layout(cfg, "exp_avg", numel)     # [PartSpec(name, numel, dtype), ...]
    init_state_(cfg, value_fp32, parts)               # import: fill every kind from fp32 weights
    adamw_update_(cfg, grad, parts, step=..., lr=...) # one AdamW step, writes new compute weights
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from .adamw import adamw_step_

KINDS = ("weights", "master", "exp_avg", "exp_avg_sq")
OPTIM_KINDS = ("master", "exp_avg", "exp_avg_sq")
# Tensors smaller than this keep fp32 state whatever the codec (norm weights, biases): compressing
# them saves nothing measurable and costs accuracy.
SMALL_NUMEL = 4096

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASTER_CODECS = ("fp32",)
STATE_CODECS = ("fp32",)

Parts = Dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    """How each kind of state is encoded in the store."""

    weights: str = "fp32"  # compute weights streamed to the device: fp32 | bf16
    master: str = "fp32"  # master weights: fp32
    states: str = "fp32"  # AdamW moments exp_avg / exp_avg_sq: fp32

    def __post_init__(self):
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights codec {self.weights!r} unknown; choose one of {', '.join(WEIGHT_DTYPES)}")
        if self.master not in MASTER_CODECS:
            raise ValueError(f"master codec {self.master!r} unknown; choose one of {', '.join(MASTER_CODECS)}")
        if self.states not in STATE_CODECS:
            raise ValueError(f"optimizer-state codec {self.states!r} unknown; choose one of {', '.join(STATE_CODECS)}")

    def to_json(self) -> dict:
        return {"weights": self.weights, "master": self.master, "states": self.states}


@dataclass(frozen=True)
class PartSpec:
    """One flat stored array of a kind of state."""

    name: str
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def state_layout(cfg: StateConfig, kind: str, numel: int) -> list[PartSpec]:
    """The parts that store `kind` of a parameter of `numel` elements."""
    if kind == "weights":
        return [PartSpec("value", numel, WEIGHT_DTYPES[cfg.weights])]
    if kind in OPTIM_KINDS:
        return [PartSpec("value", numel, torch.float32)]
    raise ValueError(f"unknown state kind {kind!r}; expected one of {KINDS}")


def decode_weights(cfg: StateConfig, parts: Parts) -> torch.Tensor:
    """The compute weights as a flat tensor of the compute dtype (a view where possible)."""
    return parts["value"]


def decode_master(cfg: StateConfig, parts: Parts) -> torch.Tensor:
    """The exact fp32 master value as a flat tensor."""
    return parts["value"].float()


@torch.no_grad()
def _emit_weights(cfg: StateConfig, master: torch.Tensor, out: Parts) -> None:
    out["value"].copy_(master)


@torch.no_grad()
def init_state_(cfg: StateConfig, value: torch.Tensor, parts: Dict[str, Parts]) -> None:
    """Fill every kind of a parameter's state from its imported value (moments start at zero)."""
    flat = value.reshape(-1).float()
    parts["master"]["value"].copy_(flat)
    parts["exp_avg"]["value"].zero_()
    parts["exp_avg_sq"]["value"].zero_()
    _emit_weights(cfg, flat, parts["weights"])


@torch.no_grad()
def adamw_update_(
    cfg: StateConfig,
    grad: torch.Tensor,
    parts: Dict[str, Parts],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step of one parameter: updates master and moments, writes the new compute weights.

    `grad` is the flat fp32 gradient; `grad_scale` multiplies it first (gradient clipping), as
    torch.nn.utils.clip_grad_norm_ does in place.
    """
    if grad_scale != 1.0:
        grad = grad * grad_scale
    master = parts["master"]["value"]
    adamw_step_(
        master,
        grad,
        parts["exp_avg"]["value"],
        parts["exp_avg_sq"]["value"],
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )
    _emit_weights(cfg, master, parts["weights"])
