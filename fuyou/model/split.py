"""How a causal LM's forward is run block by block: every decoder layer's `forward` is shadowed
on its instance by a stand-in and the causal LM's forward runs as transformers wrote it. The embed
run stops at the last layer and keeps what the model passed to each layer; the head run feeds the
block input to the last layer's stand-in and lets the forward finish. Where the forward divides,
and whether it can, is learned once by `learn.learn_split`.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import MutableMapping, MutableSequence
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn

from .errors import UnsupportedModelError

Key = Union[int, str]


class _Stop(BaseException):
    """Ends the embed run at the last decoder layer (BaseException: no `except Exception` in a
    model's forward swallows it)."""


@dataclass
class LayerInputs:
    """What the model passed to each decoder layer for one micro-batch, besides the hidden state."""

    calls: List[Tuple[tuple, dict]]
    hidden_key: Optional[str]  # the keyword the hidden state is passed as; None = first positional
    # (input key of a container the layers share, entry) -> the layer that stored it there
    stored: Dict[tuple, int] = field(default_factory=dict)

    def call(self, index: int, hidden: torch.Tensor, replace: Optional[Dict[Key, object]] = None) -> Tuple[tuple, dict]:
        args, kwargs = self.calls[index]
        if replace:  # (keys of stored entries are tuples: stored_call puts those in place)
            args = tuple(replace.get(i, a) for i, a in enumerate(args))
            kwargs = {k: replace.get(k, v) for k, v in kwargs.items()}
        if self.hidden_key is None:
            return (hidden,) + args, kwargs
        return args, {**kwargs, self.hidden_key: hidden}

    def get(self, index: int, key: Key):
        args, kwargs = self.calls[index]
        return args[key] if isinstance(key, int) else kwargs[key]

    def set(self, index: int, key: Key, value) -> None:
        args, kwargs = self.calls[index]
        if isinstance(key, int):
            self.calls[index] = (args[:key] + (value,) + args[key + 1:], kwargs)
        else:
            kwargs[key] = value


@dataclass
class Split:
    """The learned split: which parameters the embed and head parts read, how layers are called."""

    embed_params: Set[int] = field(default_factory=set)  # ids of the parameters read before the first layer
    head_params: Set[int] = field(default_factory=set)  # ... and after the last one
    arity: int = 0  # what a layer returns: 0 = the hidden state, n = an n-tuple led by it
    # Inputs of a layer besides the hidden state, by key (a positional index after the hidden state,
    # or a keyword): `side` are computed before the layers from trained parameters (their gradient
    # goes back to the embed block); `carries` (from layer, output position, to layer, key) are
    # outputs the model hands on to a later layer.
    side: Dict[int, List[Key]] = field(default_factory=dict)
    carries: List[Tuple[int, int, int, Key]] = field(default_factory=list)
    forwarded: Set[int] = field(default_factory=set)  # output positions handed on in a way fuyou cannot follow
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


def shared_containers(call: Tuple[tuple, dict]) -> List[Tuple[Key, object]]:
    """(input key, container) for the dicts and lists among a layer's recorded inputs: what a layer
    can leave state in for later layers (Gemma-3n's KVSharingDict of keys and values)."""
    args, kwargs = call
    return [(k, v) for k, v in list(enumerate(args)) + list(kwargs.items()) if isinstance(v, (MutableMapping, MutableSequence))]


def _keys(container) -> list:
    return list(container.keys()) if isinstance(container, MutableMapping) else list(range(len(container)))


def stored_call(call, shared: List[Tuple[Key, object]], read: Dict[tuple, object], inputs: LayerInputs, index: int, carry: bool):
    """Run `call()` with the shared containers holding `read` ({(input key, entry): value}, leaves
    for the backward) in place of what earlier layers stored; return (its result, what it stored
    {(input key, entry): value}). The containers then hold what they held before, except that with
    `carry` what the call stored stays in them, detached, for the layers after it."""
    before = {ckey: {k: c[k] for k in _keys(c)} for ckey, c in shared}
    by_key = dict(shared)
    for (ckey, k), value in read.items():
        by_key[ckey][k] = value
    out = call()
    stored = {}
    for ckey, c in shared:
        prior = before[ckey]
        for k in _keys(c):
            now = c[k]
            if (ckey, k) in read:
                c[k] = prior[k]
            elif k not in prior or prior[k] is not now:
                stored[(ckey, k)] = now
                owner = inputs.stored.setdefault((ckey, k), index)
                if owner != index:
                    raise UnsupportedModelError(f"decoder layers {owner} and {index} both store {k!r} for later layers; fuyou cannot tell which one a layer reads")
                if carry:
                    c[k] = _detached(now)
                elif k in prior:
                    c[k] = prior[k]
    return out, stored


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value
