"""Where a causal LM's forward divides into blocks, learned by running the model's own forward.

What the forward does before the first decoder layer's stand-in is called is the embed block (token
and position embeddings, scales, masks, rotary tables); what it does after the last one returns is
the head block (final norm of any name or none, LM head, logit multipliers, soft-capping). The
forward runs once on fake tensors on the meta device (no weights, no compute; transformers skips its
data-dependent checks for them as when compiling), with a torch-function tracer that records which
parameters each part reads and what each value was computed from, so a model that cannot be cut
into layer-wise blocks is refused with the reason instead of trained wrong.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UnsupportedModelError
from .split import Split, logits_of, model_kwargs, split_call, stand_ins

PROBE_SHAPE = (2, 3)  # batch, tokens: distinct, so a layer output taken as a tuple changes the shape
MAX_OUTPUTS = 4  # a decoder layer returns its hidden state, or a tuple of at most this many values


def _hidden_key(args: tuple, kwargs: dict) -> Optional[str]:
    if args:
        return None
    for key in ("hidden_states", "hidden_state", "hidden", "x", "inputs_embeds"):
        if key in kwargs:
            return key
    raise UnsupportedModelError("its decoder layers are called without a hidden-state input fuyou can find")


@contextlib.contextmanager
def on_meta(model: nn.Module):
    """Buffers on the meta device for the probe (parameters already are); restored after."""
    saved = []
    for module in model.modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                saved.append((module, key, buf))
                module._buffers[key] = buf.to("meta")
    try:
        yield
    finally:
        for module, key, buf in saved:
            module._buffers[key] = buf


class _Tracer(TorchFunctionMode):
    """Records which parameters each phase of the forward reads and what every value derives from:
    "in" (the token ids and mask, or parameters read before the first layer: what the head run,
    on placeholder ids and parameters, would not reproduce), "layer" (a layer's output). Values
    made from shapes, constants and buffers alone come out the same in every run and carry
    neither. Metadata reads (shape, dtype) compute nothing and count as no read."""

    def __init__(self, params: Dict[int, str]):
        super().__init__()
        self.params = params
        self.phase = "pre"
        self.reads: Dict[str, Set[int]] = {"pre": set(), "between": set(), "post": set()}
        self.lineage: Dict[int, frozenset] = {}
        self.head_reads_pre: List[str] = []
        self._keep: List[torch.Tensor] = []  # ids stay unique while the probe runs

    def mark(self, t: torch.Tensor, lineage: str) -> torch.Tensor:
        self.lineage[id(t)] = frozenset((lineage,))
        self._keep.append(t)
        return t

    def of(self, t) -> frozenset:
        return self.lineage.get(id(t), frozenset())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        lineage = set()
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            if id(t) in self.params:
                self.reads[self.phase].add(id(t))
                if self.phase == "pre":
                    lineage.add("in")
            else:
                lineage |= self.of(t)
        if self.phase == "post" and "in" in lineage:
            self.head_reads_pre.append(getattr(func, "__name__", str(func)))
        for t in outs:
            if id(t) not in self.params:
                self.lineage[id(t)] = self.of(t) | lineage
                self._keep.append(t)
        return out


@dataclass
class _Probe:
    """What one traced forward saw."""

    order: List[int] = field(default_factory=list)
    calls: List[Tuple[tuple, dict]] = field(default_factory=list)
    hidden_ok: List[bool] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None
    error: Optional[BaseException] = None
    hidden_key: Optional[str] = None
    hidden_width: int = 0


def _trace(model, layers, arity: int, tracer: _Tracer, sentinels: Optional[list]) -> _Probe:
    probe = _Probe()
    markers: List[torch.Tensor] = []
    hidden_key: List[Optional[str]] = []

    def fn(i, *args, **kwargs):
        if not hidden_key:
            hidden_key.append(_hidden_key(args, kwargs))
        h, a, k = split_call(args, kwargs, hidden_key[0])
        probe.order.append(i)
        probe.calls.append((a, k))
        probe.hidden_ok.append(not markers or h is markers[-1])
        shape = markers[0].shape if markers else h.shape
        probe.hidden_width = probe.hidden_width or h.numel() // (PROBE_SHAPE[0] * PROBE_SHAPE[1])
        markers.append(tracer.mark(torch.empty(shape, device="meta"), "layer"))
        tracer.phase = "post" if i == len(layers) - 1 else "between"
        if arity == 0:
            return markers[-1]
        extra = sentinels[i][1:arity] if sentinels is not None else [None] * (arity - 1)
        return (markers[-1], *extra)

    # Fake tensors on the meta device: no data, and transformers skips its data-dependent checks
    # (mask shortcuts, packed-sequence detection) for them as it does when compiling.
    with _fake_mode(), stand_ins(layers, fn), torch.enable_grad():
        ids = tracer.mark(torch.zeros(PROBE_SHAPE, dtype=torch.long, device="meta"), "in")
        # With a padding mask, so a head that reads it (the head run passes none) is found.
        mask = tracer.mark(torch.ones(PROBE_SHAPE, dtype=torch.long, device="meta"), "in")
        try:
            with tracer:
                out = model(**model_kwargs(model, ids, mask))
            probe.logits = logits_of(out)
        except UnsupportedModelError:
            raise
        except Exception as exc:  # a wrong guess of what layers return fails somewhere in the forward
            probe.error = exc
    probe.hidden_key = hidden_key[0] if hidden_key else None
    return probe


@contextlib.contextmanager
def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A wrong guess of a layer's outputs fails inside a fake op; torch logs each such failure.
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        log.setLevel(level)


def _consumes_last_layer(probe: _Probe, tracer: _Tracer, n_layers: int) -> bool:
    t = probe.logits
    return (
        probe.error is None and isinstance(t, torch.Tensor) and t.dim() == 3 and tuple(t.shape[:2]) == PROBE_SHAPE
        and "layer" in tracer.of(t) and len(probe.order) >= n_layers
    )


def learn_split(model: nn.Module, layers: nn.ModuleList, names: Dict[int, str], layer_of: Dict[int, int]) -> Split:
    """Trace the forward on meta and check it can be cut at the layers. `names`: id -> name of every
    parameter; `layer_of`: id -> index of the decoder layer owning it (if any)."""
    n = len(layers)
    chosen, first_error = None, None
    with on_meta(model):
        for arity in range(MAX_OUTPUTS + 1):
            tracer = _Tracer(names)
            probe = _trace(model, layers, arity, tracer, None)
            first_error = first_error or probe.error
            if _consumes_last_layer(probe, tracer, n):
                chosen = (arity, probe, tracer)
                break
        if chosen is None:
            why = f"{type(first_error).__name__}: {first_error}" if first_error else "its logits do not come from the last decoder layer"
            raise UnsupportedModelError(
                f"its forward does not run on shape-only tensors with its decoder layers stood in for, so where it divides cannot be learned ({_short(why)})"
            )
        arity, probe, tracer = chosen
        split = Split(
            embed_params=tracer.reads["pre"], head_params=tracer.reads["post"], arity=arity,
            hidden_key=probe.hidden_key, hidden_width=probe.hidden_width,
        )
        _check(probe, tracer, names, layer_of, n, split)
        if arity > 1:
            _find_carries(model, layers, arity, names, split)
    return split


def _find_carries(model, layers, arity: int, names, split: Split) -> None:
    """Which outputs of a layer the model hands on to a later layer, and as which input: each layer
    returns unique stand-in values in its extra output positions, looked for among later layers'
    inputs. A forward that cannot run on them, or passes one inside a container, leaves those
    positions to a check at run time (a layer that returns something there is refused)."""
    sentinels = [[object() for _ in range(arity)] for _ in layers]
    probe = _trace(model, layers, arity, _Tracer(names), sentinels)
    if probe.error is not None:
        split.forwarded = set(range(1, arity))
        return
    where = {id(s): (i, p) for i, row in enumerate(sentinels) for p, s in enumerate(row) if p}
    for dst, (args, kwargs) in enumerate(probe.calls):
        top = list(enumerate(args)) + list(kwargs.items())
        for key, value in top:
            if id(value) in where:
                src, p = where[id(value)]
                split.carries.append((src, p, dst, key))
        nested = {id(x) for _k, v in top if not isinstance(v, torch.Tensor) for x in tree_leaves(v) if x is not v}
        split.forwarded |= {where[x][1] for x in nested if x in where}


def _check(probe: _Probe, tracer: _Tracer, names, layer_of, n: int, split: Split) -> None:
    if probe.order != list(range(n)):
        raise UnsupportedModelError(f"its forward runs its decoder layers in the order {_short(str(probe.order))}, not each once in turn (looped or skipped layers)")
    for i, ok in enumerate(probe.hidden_ok):
        if not ok:
            raise UnsupportedModelError(f"decoder layer {i} does not take the previous layer's output unchanged (the model transforms the hidden state between layers)")
    for i, (args, kwargs) in enumerate(probe.calls):
        for key, value in list(enumerate(args)) + list(kwargs.items()):
            name = f"input {key + 1}" if isinstance(key, int) else repr(key)
            for t in tree_leaves(value):
                if not isinstance(t, torch.Tensor):
                    continue
                if "layer" in tracer.of(t):
                    raise UnsupportedModelError(f"decoder layer {i} takes {name}, computed from earlier layers' outputs; fuyou carries a layer's outputs only as they are")
                if t.requires_grad and id(t) not in names:
                    if t is not value:
                        raise UnsupportedModelError(f"decoder layer {i} takes {name} holding values computed from trained parameters; fuyou backpropagates such an input only as a tensor of its own")
                    split.side.setdefault(i, []).append(key)
    if tracer.head_reads_pre:
        raise UnsupportedModelError(f"its head reads values computed before the first decoder layer ({', '.join(sorted(set(tracer.head_reads_pre))[:3])})")
    for phase, where in (("pre", "before the first decoder layer"), ("between", "between decoder layers"), ("post", "after the last decoder layer")):
        inside = [names[p] for p in tracer.reads[phase] if p in layer_of]
        if inside:
            raise UnsupportedModelError(f"parameters of its decoder layers are read {where} ({inside[0]})")
    if tracer.reads["between"]:
        raise UnsupportedModelError(f"parameter {names[next(iter(tracer.reads['between']))]} is read between decoder layers")


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
