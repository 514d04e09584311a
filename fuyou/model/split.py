"""Where a causal LM's forward divides into blocks, learned by running the model's own forward.

Every decoder layer's `forward` is shadowed on its instance by a stand-in, and the causal LM's
forward runs as transformers wrote it: what happens before the first stand-in is called is the
embed block (token and position embeddings, scales, masks, rotary tables), what happens after the
last one returns is the head block (final norm of any name or none, LM head, logit multipliers,
soft-capping). The same stand-ins run those two blocks during training: the embed run stops at
the last layer and keeps what the model passed to each layer; the head run feeds the block input
to the last layer's stand-in and lets the forward finish.

The split is learned once, on the meta device (no weights, no compute), with a torch-function
tracer that records which parameters each part reads and what each value was computed from, so a
model that cannot be cut into layer-wise blocks is refused with the reason instead of trained wrong.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UnsupportedModelError

PROBE_SHAPE = (2, 3)  # batch, tokens: distinct, so a layer output taken as a tuple changes the shape
MAX_OUTPUTS = 4  # a decoder layer returns its hidden state, or a tuple of at most this many values


class _Stop(BaseException):
    """Ends the embed run at the last decoder layer (BaseException: no `except Exception` in a
    model's forward swallows it)."""


@dataclass
class LayerInputs:
    """What the model passed to each decoder layer for one micro-batch, besides the hidden state."""

    calls: List[Tuple[tuple, dict]]
    hidden_key: Optional[str]  # the keyword the hidden state is passed as; None = first positional

    def call(self, index: int, hidden: torch.Tensor) -> Tuple[tuple, dict]:
        args, kwargs = self.calls[index]
        if self.hidden_key is None:
            return (hidden,) + args, kwargs
        return args, {**kwargs, self.hidden_key: hidden}


@dataclass
class Split:
    """The learned split: which parameters the embed and head parts read, how layers are called."""

    embed_params: Set[int] = field(default_factory=set)  # ids of the parameters read before the first layer
    head_params: Set[int] = field(default_factory=set)  # ... and after the last one
    arity: int = 0  # what a layer returns: 0 = the hidden state, n = an n-tuple led by it
    forwarded: Set[int] = field(default_factory=set)  # tuple positions the model hands to later layers
    hidden_key: Optional[str] = None
    hidden_width: int = 0  # values per token of a block input (the hidden size, or more for several residual streams)


def model_kwargs(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> dict:
    """The keywords a plain `model(input_ids, attention_mask)` training forward passes (no cache)."""
    params = inspect.signature(model.forward).parameters
    open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kw = {"input_ids": input_ids}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    for key, value in (("use_cache", False), ("return_dict", True)):
        if key in params or open_kw:
            kw[key] = value
    return kw


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _hidden_key(args: tuple, kwargs: dict) -> Optional[str]:
    if args:
        return None
    for key in ("hidden_states", "hidden_state", "hidden", "x", "inputs_embeds"):
        if key in kwargs:
            return key
    raise UnsupportedModelError("its decoder layers are called without a hidden-state input fuyou can find")


def split_call(args: tuple, kwargs: dict, hidden_key: Optional[str]) -> Tuple[torch.Tensor, tuple, dict]:
    """(hidden state, other positional args, other keywords) of one decoder-layer call."""
    if hidden_key is None:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop(hidden_key), tuple(args), kwargs


def wrap_output(hidden: torch.Tensor, arity: int, fill=None):
    return hidden if arity == 0 else (hidden,) + (fill,) * (arity - 1)


@contextlib.contextmanager
def stand_ins(layers: nn.ModuleList, fn):
    """Shadow each layer's forward with fn(index, *args, **kwargs) (hooks and __call__ still run)."""
    for i, layer in enumerate(layers):
        layer.forward = (lambda i: lambda *a, **k: fn(i, *a, **k))(i)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


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
    "in" (model inputs and what is computed from them before the first layer), "layer" (a layer's
    output and what is computed from it). Metadata reads (shape, dtype) compute nothing and count
    as no read."""

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
            else:
                lineage |= self.of(t)
        if self.phase == "pre":
            lineage.add("in")
        elif self.phase == "post" and "in" in lineage:
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
    forwarded: Set[int] = field(default_factory=set)
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
        if sentinels is not None:
            leaves = tree_leaves((a, k))
            probe.forwarded |= {p for p, s in enumerate(sentinels) if any(x is s for x in leaves)}
        shape = markers[0].shape if markers else h.shape
        probe.hidden_width = probe.hidden_width or h.numel() // (PROBE_SHAPE[0] * PROBE_SHAPE[1])
        markers.append(tracer.mark(torch.empty(shape, device="meta"), "layer"))
        tracer.phase = "post" if i == len(layers) - 1 else "between"
        if arity == 0:
            return markers[-1]
        extra = sentinels[1:arity] if sentinels is not None else [None] * (arity - 1)
        return (markers[-1], *extra)

    # Fake tensors on the meta device: no data, and transformers skips its data-dependent checks
    # (mask shortcuts, packed-sequence detection) for them as it does when compiling.
    with _fake_mode(), stand_ins(layers, fn), torch.enable_grad():
        ids = tracer.mark(torch.zeros(PROBE_SHAPE, dtype=torch.long, device="meta"), "in")
        try:
            with tracer:
                out = model(**model_kwargs(model, ids, None))
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
            raise UnsupportedModelError(f"its forward cannot be traced with its decoder layers stood in for ({_short(why)})")
        arity, probe, tracer = chosen
        _check(probe, tracer, names, layer_of, n)
        forwarded = _forwarded_outputs(model, layers, arity, names) if arity > 1 else set()
    return Split(
        embed_params=tracer.reads["pre"], head_params=tracer.reads["post"], arity=arity, forwarded=forwarded,
        hidden_key=probe.hidden_key, hidden_width=probe.hidden_width,
    )


def _forwarded_outputs(model, layers, arity: int, names) -> Set[int]:
    """Positions of a layer's output tuple that the model passes on to later layers (found with
    unique stand-in values; a forward that cannot run on them counts every position)."""
    sentinels = [object() for _ in range(arity)]
    probe = _trace(model, layers, arity, _Tracer(names), sentinels)
    if probe.error is not None:
        return set(range(1, arity))
    return probe.forwarded - {0}


def _check(probe: _Probe, tracer: _Tracer, names, layer_of, n: int) -> None:
    if probe.order != list(range(n)):
        raise UnsupportedModelError(f"its forward runs its decoder layers in the order {_short(str(probe.order))}, not each once in turn (looped or skipped layers)")
    for i, ok in enumerate(probe.hidden_ok):
        if not ok:
            raise UnsupportedModelError(f"decoder layer {i} does not take the previous layer's output unchanged (the model transforms the hidden state between layers)")
    for i, (args, kwargs) in enumerate(probe.calls):
        for key, value in list(enumerate(args)) + list(kwargs.items()):
            for t in tree_leaves(value):
                if not isinstance(t, torch.Tensor):
                    continue
                if "layer" in tracer.of(t):
                    raise UnsupportedModelError(f"decoder layer {i} takes {key!r}, computed from earlier layers' outputs; fuyou carries only the hidden state between layers")
                if t.requires_grad and id(t) not in names:
                    raise UnsupportedModelError(f"decoder layer {i} takes {key!r}, computed from trained parameters before the layers; fuyou backpropagates only the hidden state between blocks")
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


def embed_run(model, layers, split: Split, input_ids, attention_mask) -> Tuple[torch.Tensor, LayerInputs]:
    """The forward up to the last decoder layer: (first layer's input, every layer's other inputs).
    Stand-ins hand the first layer's input on unchanged, so nothing of a layer runs."""
    calls: List[Tuple[tuple, dict]] = []
    first: List[torch.Tensor] = []

    def fn(i, *args, **kwargs):
        h, a, k = split_call(args, kwargs, split.hidden_key)
        if not first:
            first.append(h)
        calls.append((a, k))
        if i == len(layers) - 1:
            raise _Stop
        return wrap_output(first[0], split.arity)

    with stand_ins(layers, fn):
        try:
            model(**model_kwargs(model, input_ids, attention_mask))
        except _Stop:
            pass
    if len(calls) != len(layers):
        raise UnsupportedModelError(f"its forward called {len(calls)} of its {len(layers)} decoder layers")
    return first[0], LayerInputs(calls, split.hidden_key)


def head_run(model, layers, split: Split, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the last decoder layer's output: the forward runs again with the last layer's
    stand-in returning `hidden`; what it computes before the layers feeds nothing the head reads
    (learn_split checked that), so it runs on placeholder ids."""
    ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)

    def fn(i, *args, **kwargs):
        h, _a, _k = split_call(args, kwargs, split.hidden_key)
        return wrap_output(hidden if i == len(layers) - 1 else h, split.arity)

    with stand_ins(layers, fn):
        return logits_of(model(**model_kwargs(model, ids, None)))
