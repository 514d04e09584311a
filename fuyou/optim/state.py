"""Per-parameter training state as the store keeps it, and the optimizer update over it.

Each parameter has four kinds of state: `weights` (the compute copy streamed to the device),
`master` (the exact value the optimizer updates), `exp_avg` and `exp_avg_sq` (AdamW moments). Each
kind is stored in a codec as one or more flat *parts* (e.g. fp8 codes + fp32 scales). The store
lays the parts out in the block's files; the runtime hands this module flat tensor views of them.

    layout = state_layout(cfg, "exp_avg", numel)     # [PartSpec(name, numel, dtype), ...]
    init_state_(cfg, value_fp32, parts)               # import: fill every kind from fp32 weights
    adamw_update_(cfg, grad, parts, step=..., lr=...) # one AdamW step, writes new compute weights

The codecs are in codecs.py (plain-torch references); the fused C++ kernel (fuyou._adam, fused.py)
runs the whole update in one pass when it is built, and reproduces the references.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from . import fused
from .adamw import adamw_step_
from .codecs import (
    MASTER_CODECS,
    SMALL_NUMEL,
    STATE_CODECS,
    PartSpec,
    decode_master_ref,
    decode_moment,
    encode_master_,
    encode_moment_,
    master_layout,
    moment_layout,
)

KINDS = ("weights", "master", "exp_avg", "exp_avg_sq")
OPTIM_KINDS = ("master", "exp_avg", "exp_avg_sq")
# Weight codec -> the dtype a GPU computes in. "fp8": E4M3 codes with an fp32 scale per 128x128
# tile (the blockwise-FP8 GEMM format of fuyou.kernels) for 2-D weights of >= SMALL_NUMEL
# elements; other parameters (norms, biases) keep bf16.
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
FP8_TILE = 128
# FUYOU_ADAM_BACKEND=torch forces the plain-torch reference path; `fused` requires the C++ kernel.
BACKENDS = ("auto", "fused", "torch")

Parts = Dict[str, torch.Tensor]

__all__ = [
    "BACKENDS", "KINDS", "OPTIM_KINDS", "SMALL_NUMEL", "PartSpec", "StateConfig", "adamw_update_",
    "bytes_per_param_step", "decode_master", "decode_state", "decode_weights", "init_state_", "set_weight_shape_", "state_layout",
]


@dataclass(frozen=True, kw_only=True)
class StateConfig:
    """How each kind of state is encoded in the store."""

    weights: str = "fp32"  # compute weights streamed to the device: fp32 | bf16 | fp8 (blockwise E4M3)
    master: str = "fp32"  # master weights: fp32 | bf16+rem (exact fp32 as bf16 + 16-bit remainder)
    states: str = "fp32"  # AdamW moments exp_avg / exp_avg_sq: fp32 | bf16 | fp8 (E4M3+DRE) | de8

    def __post_init__(self):
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"weights codec {self.weights!r} unknown; choose one of {', '.join(WEIGHT_DTYPES)}")
        if self.master not in MASTER_CODECS:
            raise ValueError(f"master codec {self.master!r} unknown; choose one of {', '.join(MASTER_CODECS)}")
        if self.states not in STATE_CODECS:
            raise ValueError(f"optimizer-state codec {self.states!r} unknown; choose one of {', '.join(STATE_CODECS)}")

    def to_json(self) -> dict:
        return {"weights": self.weights, "master": self.master, "states": self.states}


def _fp8_weight(cfg: StateConfig, numel: int, shape) -> bool:
    return cfg.weights == "fp8" and shape is not None and len(shape) == 2 and numel >= SMALL_NUMEL


def state_layout(cfg: StateConfig, kind: str, numel: int, shape=None) -> list[PartSpec]:
    """The parts that store `kind` of a parameter of `numel` elements (`shape` matters only to
    fp8 weights, whose scales are per 128x128 tile; their "dims" part records [N, K])."""
    if kind == "weights":
        if _fp8_weight(cfg, numel, shape):
            n, k = (int(d) for d in shape)
            tiles = -(-n // FP8_TILE) * -(-k // FP8_TILE)
            return [PartSpec("codes", numel, torch.uint8), PartSpec("scales", tiles, torch.float32), PartSpec("dims", 2, torch.int64)]
        return [PartSpec("value", numel, WEIGHT_DTYPES[cfg.weights])]
    if kind == "master":
        return master_layout(cfg.master, numel)
    if kind in ("exp_avg", "exp_avg_sq"):
        return moment_layout(cfg.states, numel)
    raise ValueError(f"unknown state kind {kind!r}; expected one of {KINDS}")


def bytes_per_param_step(cfg: StateConfig, numel: int = 1 << 24, shape=(4096, 4096)) -> dict:
    """Store bytes moved per parameter in one training step, for a tensor of `numel` elements.

    The step reads the compute weights twice (forward and backward), reads and writes master and
    both moments (the optimizer), and writes the new compute weights. Group scales are included.
    """
    def per_param(kind: str) -> float:
        return sum(p.nbytes for p in state_layout(cfg, kind, numel, shape)) / numel

    w, master = per_param("weights"), per_param("master")
    m, v = per_param("exp_avg"), per_param("exp_avg_sq")
    out = {
        "weights_read": 2 * w,
        "master_read": master,
        "exp_avg_read": m,
        "exp_avg_sq_read": v,
        "master_write": master,
        "exp_avg_write": m,
        "exp_avg_sq_write": v,
        "weights_write": w,
    }
    out["total"] = sum(out.values())
    return out


def decode_weights(cfg: StateConfig, parts: Parts) -> torch.Tensor:
    """The compute weights as a flat tensor: a view of the stored value, or (fp8) dequantized fp32."""
    if "codes" in parts:
        from ..kernels.reference import dequantize_weight_fp8

        n, k = (int(d) for d in parts["dims"])
        scales = parts["scales"].view(-(-n // FP8_TILE), -(-k // FP8_TILE))
        return dequantize_weight_fp8(parts["codes"], scales, (n, k)).reshape(-1)
    return parts["value"]


def decode_master(cfg: StateConfig, parts: Parts) -> torch.Tensor:
    """The exact fp32 master value as a flat tensor."""
    return decode_master_ref(parts)


def decode_state(cfg: StateConfig, kind: str, parts: Parts, numel: int) -> torch.Tensor:
    """A moment (`exp_avg` / `exp_avg_sq`) as a new flat fp32 tensor."""
    if kind not in ("exp_avg", "exp_avg_sq"):
        raise ValueError(f"decode_state decodes exp_avg or exp_avg_sq, not {kind!r}; use decode_master/decode_weights")
    return decode_moment(parts, numel, signed=kind == "exp_avg")


@torch.no_grad()
def _emit_weights(cfg: StateConfig, master: torch.Tensor, out: Parts) -> None:
    if "codes" in out:
        from ..kernels.reference import quantize_weight_fp8

        n, k = (int(d) for d in out["dims"])
        codes, scales = quantize_weight_fp8(master.reshape(n, k))  # from the exact fp32 master
        out["codes"].copy_(codes.view(torch.uint8).reshape(-1))
        out["scales"].copy_(scales.reshape(-1))
        return
    out["value"].copy_(master)


def emit_weights_(cfg: StateConfig, parts: Dict[str, Parts]) -> None:
    """The compute weights of an unchanged master (a parameter the optimizer skips this step)."""
    _emit_weights(cfg, decode_master(cfg, parts["master"]), parts["weights"])


def set_weight_shape_(weights_parts: Parts, shape) -> None:
    """Record [N, K] in an fp8 weights region before the optimizer emits into it (a no-op otherwise)."""
    if "dims" in weights_parts:
        weights_parts["dims"].copy_(torch.tensor([int(d) for d in shape], dtype=torch.int64))


@torch.no_grad()
def init_state_(cfg: StateConfig, value: torch.Tensor, parts: Dict[str, Parts]) -> None:
    """Fill every kind of a parameter's state from its imported value (moments start at zero)."""
    flat = value.reshape(-1).float()
    if "dims" in parts["weights"]:
        if value.dim() != 2:
            raise ValueError(f"fp8 weights need the 2-D parameter, got shape {tuple(value.shape)}")
        set_weight_shape_(parts["weights"], value.shape)
    encode_master_(flat, parts["master"])
    zeros = torch.zeros_like(flat)
    encode_moment_(zeros, parts["exp_avg"], signed=True)
    encode_moment_(zeros, parts["exp_avg_sq"], signed=False)
    _emit_weights(cfg, flat, parts["weights"])


def _fp32_mode(cfg: StateConfig) -> bool:
    return cfg.master == "fp32" and cfg.states == "fp32"


def _fp8_weights_scratch(parts: Dict[str, Parts], numel: int) -> Dict[str, Parts]:
    """The kernel emits fp32/bf16 weights only: for fp8 weights it writes a bf16 scratch copy, and
    the new master is quantized into 128x128-tile fp8 afterwards (parameters that fp8 weights keep
    in bf16 have a bf16 value part and need none)."""
    if "codes" not in parts["weights"]:
        return {}
    return {"weights": {"value": torch.empty(numel, dtype=torch.bfloat16)}}


def _pick_backend(backend: Optional[str], cfg: StateConfig) -> str:
    backend = backend or os.environ.get("FUYOU_ADAM_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"AdamW backend {backend!r} unknown; choose one of {', '.join(BACKENDS)} (FUYOU_ADAM_BACKEND)")
    if backend == "auto":
        return "fused" if fused.available() else "torch"
    if backend == "fused" and not fused.available():
        raise RuntimeError(f"fused AdamW requested but fuyou._adam is not built ({fused.import_error()}); "
                           "run `python setup.py build_ext --inplace` or use backend='torch'")
    return backend


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
    backend: Optional[str] = None,
    threads: Optional[int] = None,
    exact_sqrt: Optional[bool] = None,
) -> None:
    """One AdamW step of one parameter: updates master and moments, writes the new compute weights.

    `exact_sqrt`: None = torch's own sqrt in fp32 mode (as torch.optim.AdamW; the fused backend
    runs its kernel around torch.sqrt then), the correctly rounded one otherwise (the fused kernel's).
    A compressed codec with exact_sqrt=False takes the torch path.

    `grad` is the flat fp32 gradient; `grad_scale` multiplies it first (gradient clipping), as
    torch.nn.utils.clip_grad_norm_ does in place. `backend` (default: FUYOU_ADAM_BACKEND or auto)
    picks the fused C++ kernel or the torch reference; `threads` defaults to torch.get_num_threads().
    """
    if step < 1:
        raise ValueError(f"AdamW step counts from 1, got {step}")
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    # Compressed codecs: correctly rounded sqrt (both backends, so they agree bit for bit on any
    # CPU). fp32 mode: torch's sqrt, so that fuyou trains exactly like torch.optim.AdamW.
    exact = not _fp32_mode(cfg) if exact_sqrt is None else exact_sqrt
    if _pick_backend(backend, cfg) == "fused" and (exact or _fp32_mode(cfg)):
        scratch = _fp8_weights_scratch(parts, grad.numel())
        run = fused.adamw_fused_ if exact else fused.adamw_torch_sqrt_  # fp32 mode: around torch's sqrt
        run("bf16" if cfg.weights == "fp8" else cfg.weights, grad, {**parts, **scratch}, grad_scale=grad_scale, threads=threads, **hyper)
        if scratch:
            _emit_weights(cfg, decode_master_ref(parts["master"]), parts["weights"])
        return
    if grad_scale != 1.0:
        grad = grad * grad_scale
    numel = grad.numel()
    master = decode_master_ref(parts["master"])
    m = decode_moment(parts["exp_avg"], numel, signed=True)
    v = decode_moment(parts["exp_avg_sq"], numel, signed=False)
    adamw_step_(master, grad.reshape(-1).float(), m, v, exact_sqrt=exact, **hyper)
    encode_master_(master, parts["master"])
    encode_moment_(m, parts["exp_avg"], signed=True)
    encode_moment_(v, parts["exp_avg_sq"], signed=False)
    _emit_weights(cfg, master, parts["weights"])
