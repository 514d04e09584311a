"""Per-parameter training state as the store keeps it, and the optimizer update over it.

Each parameter has four kinds of state: `weights` (the compute copy streamed to the device),
`master` (the exact value the optimizer updates), `exp_avg` and `exp_avg_sq` (AdamW moments). A
StateConfig names a codec per kind; codecs.py resolves each name, with the parameter's size and
shape, to the Codec that stores it as one or more flat *parts* (e.g. fp8 codes + fp32 scales).
`StateCodecs` gives the store those layouts; the runtime hands this module flat tensor views of them.

    layout = state_layout(cfg, "exp_avg", numel)                # [PartSpec(name, numel, dtype), ...]
    init_state_(cfg, value, parts)                               # import: fill every kind from the value
    adamw_update_(cfg, grad, parts, shape=shape, step=..., lr=...)  # one AdamW step, writes new compute weights

The fused C++ kernel (fuyou._adam, fused.py) runs the whole update in one pass when it is built,
and reproduces the codecs' plain-torch references.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from ..config import StateConfig
from ..store.layout import PartSpec
from . import fused
from .adamw import adamw_step_
from .codecs import (
    SMALL_NUMEL,
    WEIGHTS_REGISTRY,
    Codec,
    ParamCodecs,
    Parts,
    Shape,
    master_codec,
    moment_codec,
    weights_codec,
)

KINDS = ("weights", "master", "exp_avg", "exp_avg_sq")
OPTIM_KINDS = ("master", "exp_avg", "exp_avg_sq")
# Weights codec name -> the dtype a GPU computes in (fp8 weights: bf16; codecs.py has how each is stored).
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# FUYOU_ADAM_BACKEND=torch forces the plain-torch reference path; `fused` requires the C++ kernel.
BACKENDS = ("auto", "fused", "torch")

__all__ = [
    "BACKENDS", "KINDS", "OPTIM_KINDS", "SMALL_NUMEL", "StateCodecs", "adamw_update_", "bytes_per_param_step",
    "decode_master", "decode_state", "decode_weights", "init_state_", "param_codecs", "state_layout",
]


@dataclass(frozen=True)
class StateCodecs:
    """A StateConfig as the store's StateLayout: the kinds of state, the parts each kind of a
    parameter is stored as, and the manifest's "state" entry. `weights_only`: a frozen base's store
    (LoRA), which keeps the compute weights alone."""

    cfg: StateConfig
    weights_only: bool = False

    @property
    def kinds(self) -> tuple:
        return ("weights",) if self.weights_only else KINDS

    @classmethod
    def from_json(cls, entry: dict) -> "StateCodecs":
        entry = dict(entry)
        kinds = entry.pop("kinds", None)
        if kinds not in (None, ["weights"]):
            raise ValueError(f"state kinds {kinds!r}: a store keeps every kind or the weights alone")
        return cls(StateConfig(**entry), weights_only=kinds is not None)

    def to_json(self) -> dict:
        return {**self.cfg.to_json(), "kinds": ["weights"]} if self.weights_only else self.cfg.to_json()

    def parts(self, kind: str, numel: int, shape: Shape = None) -> list[PartSpec]:
        return state_layout(self.cfg, kind, numel, shape)


def param_codecs(cfg: StateConfig, numel: int, shape: Shape = None) -> ParamCodecs:
    """The codecs of a parameter of `numel` elements and `shape` (which matters only to fp8 weights)."""
    return ParamCodecs(
        weights=weights_codec(cfg.weights, numel, shape),
        master=master_codec(cfg.master, numel),
        moments=moment_codec(cfg.states, numel),
    )


def _kind_codec(codecs: ParamCodecs, kind: str) -> Codec:
    if kind == "weights":
        return codecs.weights
    if kind == "master":
        return codecs.master
    if kind in ("exp_avg", "exp_avg_sq"):
        return codecs.moments
    raise ValueError(f"unknown state kind {kind!r}; expected one of {KINDS}")


def state_layout(cfg: StateConfig, kind: str, numel: int, shape: Shape = None) -> list[PartSpec]:
    """The parts that store `kind` of a parameter of `numel` elements (`shape` matters only to
    fp8 weights, whose scales are per 128x128 tile; their "dims" part records [N, K])."""
    return _kind_codec(param_codecs(cfg, numel, shape), kind).layout(numel, shape)


def bytes_per_param_step(cfg: StateConfig, numel: int = 1 << 24, shape=(4096, 4096)) -> dict:
    """Store bytes moved per parameter in one training step, for a tensor of `numel` elements.

    The step reads the compute weights twice (forward and backward), reads and writes master and
    both moments (the optimizer), and writes the new compute weights. Group scales are included.
    """
    codecs = param_codecs(cfg, numel, shape)
    w = codecs.weights.bytes_per_element(numel, shape)
    master, moment = codecs.master.bytes_per_element(numel), codecs.moments.bytes_per_element(numel)
    out = {
        "weights_read": 2 * w,
        "master_read": master,
        "exp_avg_read": moment,
        "exp_avg_sq_read": moment,
        "master_write": master,
        "exp_avg_write": moment,
        "exp_avg_sq_write": moment,
        "weights_write": w,
    }
    out["total"] = sum(out.values())
    return out


def decode_weights(cfg: StateConfig, parts: Parts, shape: Sequence[int]) -> torch.Tensor:
    """The compute weights of a parameter of `shape` as a flat tensor: a view of the stored value,
    or (fp8) dequantized fp32."""
    numel = math.prod(shape)
    return weights_codec(cfg.weights, numel, shape).values(parts, numel)


def decode_master(cfg: StateConfig, parts: Parts, numel: int) -> torch.Tensor:
    """The exact fp32 master value as a new flat tensor."""
    return master_codec(cfg.master, numel).decode(parts, numel)


def decode_state(cfg: StateConfig, kind: str, parts: Parts, numel: int) -> torch.Tensor:
    """A moment (`exp_avg` / `exp_avg_sq`) as a new flat fp32 tensor."""
    if kind not in ("exp_avg", "exp_avg_sq"):
        raise ValueError(f"decode_state decodes exp_avg or exp_avg_sq, not {kind!r}; use decode_master/decode_weights")
    return moment_codec(cfg.states, numel).decode(parts, numel, signed=kind == "exp_avg")


def _check_parts(codecs: ParamCodecs, parts: Dict[str, Parts], numel: int, shape: Shape) -> None:
    """Refuse parts laid out for other codecs (e.g. fp8 weights updated without their shape)."""
    for kind in KINDS:
        want = [p.name for p in _kind_codec(codecs, kind).layout(numel, shape)]
        if sorted(parts[kind]) != sorted(want):
            raise ValueError(f"{kind} parts {sorted(parts[kind])} are not those of codec {_kind_codec(codecs, kind).name!r} "
                             f"for {numel} elements of shape {shape} ({want}); lay them out with state_layout() for that shape")


@torch.no_grad()
def emit_weights_(cfg: StateConfig, parts: Dict[str, Parts], numel: int, shape: Shape = None) -> None:
    """The compute weights of an unchanged master (a parameter the optimizer skips this step)."""
    codecs = param_codecs(cfg, numel, shape)
    codecs.weights.encode_(codecs.master.decode(parts["master"], numel), parts["weights"], shape=shape)


@torch.no_grad()
def init_weights_(cfg: StateConfig, value: torch.Tensor, weights: Parts) -> None:
    """A frozen base's compute weights from the imported value (its store keeps nothing else)."""
    shape = tuple(value.shape)
    flat = value.reshape(-1).float()
    param_codecs(cfg, flat.numel(), shape).weights.encode_(flat, weights, shape=shape)


@torch.no_grad()
def init_state_(cfg: StateConfig, value: torch.Tensor, parts: Dict[str, Parts]) -> None:
    """Fill every kind of a parameter's state from its imported value, whose shape is the
    parameter's (moments start at zero)."""
    shape = tuple(value.shape)
    flat = value.reshape(-1).float()
    codecs = param_codecs(cfg, flat.numel(), shape)
    _check_parts(codecs, parts, flat.numel(), shape)
    codecs.master.encode_(flat, parts["master"])
    zeros = torch.zeros_like(flat)
    codecs.moments.encode_(zeros, parts["exp_avg"], signed=True)
    codecs.moments.encode_(zeros, parts["exp_avg_sq"], signed=False)
    codecs.weights.encode_(flat, parts["weights"], shape=shape)


def _fp32_mode(cfg: StateConfig) -> bool:
    return cfg.master == "fp32" and cfg.states == "fp32"


def _pick_backend(backend: Optional[str]) -> str:
    backend = backend or os.environ.get("FUYOU_ADAM_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"AdamW backend {backend!r} unknown; choose one of {', '.join(BACKENDS)} (FUYOU_ADAM_BACKEND)")
    if backend == "auto":
        return "fused" if fused.available() else "torch"
    if backend == "fused" and not fused.available():
        raise RuntimeError(f"fused AdamW requested but fuyou._adam is not built ({fused.import_error()}); "
                           "run `python setup.py build_ext --inplace` or use backend='torch'")
    return backend


def _fused_update_(codecs: ParamCodecs, grad: torch.Tensor, parts: Dict[str, Parts], shape: Shape, *, exact: bool, **kw) -> None:
    """The update on the fused kernel: whole (correctly rounded sqrt) or around torch's sqrt (fp32 mode)."""
    run = fused.adamw_fused_ if exact else fused.adamw_torch_sqrt_
    if codecs.weights.kernel_id is not None:
        run(codecs, grad, parts, **kw)
        return
    # The kernel emits fp32/bf16 weights only: for others (fp8) it writes a bf16 scratch copy, and
    # the new weights are encoded from the exact new master afterwards.
    scratch = WEIGHTS_REGISTRY["bf16"]
    numel = grad.numel()
    scratch_parts = {p.name: torch.empty(p.numel, dtype=p.dtype) for p in scratch.layout(numel)}
    run(dataclasses.replace(codecs, weights=scratch), grad, {**parts, "weights": scratch_parts}, **kw)
    codecs.weights.encode_(codecs.master.decode(parts["master"], numel), parts["weights"], shape=shape)


@torch.no_grad()
def adamw_update_(
    cfg: StateConfig,
    grad: torch.Tensor,
    parts: Dict[str, Parts],
    *,
    step: int,
    lr: float,
    shape: Shape = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    backend: Optional[str] = None,
    threads: Optional[int] = None,
    exact_sqrt: Optional[bool] = None,
) -> None:
    """One AdamW step of one parameter: updates master and moments, writes the new compute weights.

    `shape`: the parameter's (fp8 weights are tiles of 2-D parameters; None: flat).
    `exact_sqrt`: None = torch's own sqrt in fp32 mode (as torch.optim.AdamW; the fused backend
    runs its kernel around torch.sqrt then), the correctly rounded one otherwise (the fused kernel's).
    A compressed codec with exact_sqrt=False takes the torch path.

    `grad` is the flat fp32 gradient; `grad_scale` multiplies it first (gradient clipping), as
    torch.nn.utils.clip_grad_norm_ does in place. `backend` (default: FUYOU_ADAM_BACKEND or auto)
    picks the fused C++ kernel or the torch reference; `threads` defaults to torch.get_num_threads().
    """
    if step < 1:
        raise ValueError(f"AdamW step counts from 1, got {step}")
    numel = grad.numel()
    codecs = param_codecs(cfg, numel, shape)
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    # Compressed codecs: correctly rounded sqrt (both backends, so they agree bit for bit on any
    # CPU). fp32 mode: torch's sqrt, so that fuyou trains exactly like torch.optim.AdamW.
    exact = not _fp32_mode(cfg) if exact_sqrt is None else exact_sqrt
    if _pick_backend(backend) == "fused" and (exact or _fp32_mode(cfg)):
        _fused_update_(codecs, grad, parts, shape, exact=exact, grad_scale=grad_scale, threads=threads, **hyper)
        return
    _check_parts(codecs, parts, numel, shape)  # the fused binding checks each part it hands over instead
    if grad_scale != 1.0:
        grad = grad * grad_scale
    master = codecs.master.decode(parts["master"], numel)
    m = codecs.moments.decode(parts["exp_avg"], numel, signed=True)
    v = codecs.moments.decode(parts["exp_avg_sq"], numel, signed=False)
    adamw_step_(master, grad.reshape(-1).float(), m, v, exact_sqrt=exact, **hyper)
    codecs.master.encode_(master, parts["master"])
    codecs.moments.encode_(m, parts["exp_avg"], signed=True)
    codecs.moments.encode_(v, parts["exp_avg_sq"], signed=False)
    codecs.weights.encode_(master, parts["weights"], shape=shape)
