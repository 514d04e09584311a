"""Layer inputs besides the hidden state that carry a gradient.

Three kinds: values the embed block computes from trained parameters and hands to every layer
(`Split.side`: Gemma-3n's per-layer embeddings, CPM-Ant's learned position bias, Zamba2's original
embeddings); outputs a layer hands on to a later one (`Split.carries`: a router state, top-k
indices); and entries a layer stores into a container the layers share, for later layers to read
(`LayerInputs.stored`: Gemma-3n's shared keys and values). A layer's backward takes them as
leaves, keeps their gradients per micro-batch, and they are backpropagated where they came from:
through the embed block's recomputed forward, or through the earlier layer's outputs in its own
backward. Integer values (indices) carry no gradient and are only handed on.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..model.split import Key, LayerInputs
from .context import StepState


def _differentiable(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _sources(sk, layer: int) -> Dict[Key, tuple]:
    """Input key of `layer` -> where its gradient goes: ("embed", layer, key) or ("carry", from layer, position)."""
    out = {key: ("embed", layer, key) for key in sk.split.side.get(layer, [])}
    out.update({key: ("carry", src, pos) for src, pos, dst, key in sk.split.carries if dst == layer})
    return out


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _leafed(value):
    if _differentiable(value):
        return value.detach().requires_grad_(True)
    if isinstance(value, (tuple, list)):
        return type(value)(_leafed(v) for v in value)
    return value


def leaves(sk, layer: int, inputs: LayerInputs) -> Dict[object, object]:
    """Fresh leaves for the gradient-carrying inputs of `layer` (to pass as layer_call's `replace`):
    by input key, and by (container key, entry) for what earlier layers stored."""
    out = {}
    for key in _sources(sk, layer):
        v = inputs.get(layer, key)
        if _differentiable(v):
            out[key] = v.detach().requires_grad_(True)
    for (ckey, entry), src in inputs.stored.items():
        if src < layer:
            value = _leafed(inputs.get(layer, ckey)[entry])
            if any(t.requires_grad for t in _tensors(value)):
                out[(ckey, entry)] = value
    return out


def backward(sk, layer: int, hidden_out: torch.Tensor, extra: tuple, stored: dict, grad: torch.Tensor, st: StepState, m: int) -> None:
    """Backpropagate a layer's outputs: the hidden state's gradient, and for what it handed on or
    stored for later layers, the gradients those layers' leaves got."""
    roots, grads = [hidden_out], [grad]
    pending = st.side_grads.setdefault(m, {})
    for pos in sorted({pos for src, pos, _dst, _key in sk.split.carries if src == layer}):
        g = pending.pop(("carry", layer, pos), None)
        if g is not None and extra and isinstance(extra[pos], torch.Tensor) and extra[pos].requires_grad:
            roots.append(extra[pos])
            grads.append(g)
    for (ckey, entry), value in stored.items():
        got = pending.pop(("stored", layer, ckey, entry), None)
        for t, g in zip(_tensors(value), got or []):
            if g is not None and t.requires_grad:
                roots.append(t)
                grads.append(g)
    torch.autograd.backward(roots, grads)


def keep(sk, layer: int, got: Dict[object, object], inputs: LayerInputs, st: StepState, m: int) -> None:
    """After a layer's backward: its input leaves' gradients, summed per source as they come."""
    pending = st.side_grads.setdefault(m, {})
    sources = _sources(sk, layer)
    for key, leaf in got.items():
        if isinstance(key, tuple):  # an entry an earlier layer stored
            src = ("stored", inputs.stored[key]) + key
            new = [t.grad for t in _tensors(leaf)]
            if all(g is None for g in new):
                continue
            old = pending.get(src)
            pending[src] = new if old is None else [o if g is None else (g if o is None else o.add_(g)) for o, g in zip(old, new)]
            continue
        if leaf.grad is None:
            continue
        src = sources[key]
        pending[src] = leaf.grad if src not in pending else pending[src].add_(leaf.grad)


def embed_roots(inputs: LayerInputs, st: StepState, m: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The embed block's values the layers took as side inputs (recomputed with their graph), and
    the gradients the layers gave them."""
    roots, grads = [], []
    for src, g in sorted(st.side_grads.pop(m, {}).items(), key=lambda kv: (kv[0][1], str(kv[0][2:]))):
        if src[0] == "embed":
            roots.append(inputs.get(src[1], src[2]))
            grads.append(g)
    return roots, grads
