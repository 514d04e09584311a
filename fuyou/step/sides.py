"""Layer inputs besides the hidden state that carry a gradient.

Two kinds (`Split.side` and `Split.carries`, learned from the model's forward): values the embed
block computes from trained parameters and hands to every layer (Gemma-3n's per-layer embeddings,
CPM-Ant's learned position bias, Zamba2's original embeddings), and outputs a layer hands on to a
later one (a router state, top-k indices). A layer's backward takes them as leaves, keeps their
gradients per micro-batch, and they are backpropagated where they came from: through the embed
block's recomputed forward, or through the earlier layer's outputs in its own backward. Integer
values (indices) carry no gradient and are only handed on.
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


def leaves(sk, layer: int, inputs: LayerInputs) -> Dict[Key, torch.Tensor]:
    """Fresh leaves for the gradient-carrying inputs of `layer` (to pass as layer_call's `replace`)."""
    out = {}
    for key in _sources(sk, layer):
        v = inputs.get(layer, key)
        if _differentiable(v):
            out[key] = v.detach().requires_grad_(True)
    return out


def backward(sk, layer: int, hidden_out: torch.Tensor, extra: tuple, grad: torch.Tensor, st: StepState, m: int) -> None:
    """Backpropagate a layer's outputs: the hidden state's gradient, and for outputs it handed on,
    the gradients the later layers' leaves got."""
    roots, grads = [hidden_out], [grad]
    pending = st.side_grads.setdefault(m, {})
    for pos in sorted({pos for src, pos, _dst, _key in sk.split.carries if src == layer}):
        g = pending.pop(("carry", layer, pos), None)
        if g is not None and extra and isinstance(extra[pos], torch.Tensor) and extra[pos].requires_grad:
            roots.append(extra[pos])
            grads.append(g)
    torch.autograd.backward(roots, grads)


def keep(sk, layer: int, got: Dict[Key, torch.Tensor], st: StepState, m: int) -> None:
    """After a layer's backward: its input leaves' gradients, summed per source as they come."""
    pending = st.side_grads.setdefault(m, {})
    sources = _sources(sk, layer)
    for key, leaf in got.items():
        if leaf.grad is None:
            continue
        src = sources[key]
        pending[src] = leaf.grad if src not in pending else pending[src].add_(leaf.grad)


def embed_roots(inputs: LayerInputs, st: StepState, m: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The embed block's values the layers took as side inputs (recomputed with their graph), and
    the gradients the layers gave them."""
    roots, grads = [], []
    for src, g in sorted(st.side_grads.pop(m, {}).items(), key=lambda kv: (kv[0][1], str(kv[0][2]))):
        if src[0] == "embed":
            roots.append(inputs.get(src[1], src[2]))
            grads.append(g)
    return roots, grads
