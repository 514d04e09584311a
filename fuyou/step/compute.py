"""The compute lane's work for one consumer: attach a block's weights, run its micro-batches, detach.

Kept apart from runtime.py (graph and slots) so the numerics of a step can be read in one place.
Block indices: 0 = embedding, 1..L = decoder layers, L+1 = head; saved activation (i, m) is the
input of block i for micro-batch m.

Two ways to backpropagate a decoder layer:
- recompute (the plan's `recompute`): the forward runs without autograd and keeps only the block
  input; the backward reruns the block's forward from it, then backpropagates (4 passes of work);
- keep: the forward builds the autograd graph and keeps its activations, but not the weights — the
  weight slot is reused by the next blocks. Saved-tensor hooks record a weight (or a view of it) as
  its offset in the slot, and the backward resolves it in the slot it re-read the same block's
  weights into; the backward then runs without a recompute (3 passes, like plain PyTorch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch

from ..model.skeleton import causal_lm_loss_sum

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime, _StepState


def run_consumer(rt: "Runtime", u: int, st: "_StepState") -> None:
    c = rt.cons[u]
    index = rt.sk.block(c.block).index
    keep = not rt.plan.recompute and rt.sk.block(c.block).is_layer
    weights = rt._weights(u)
    train = c.phase != "fwd"
    params = rt.sk.attach(weights, requires_grad=train or keep)
    if keep and c.phase == "bwd":
        params = st.fwd_params.pop(index)  # the Parameters the kept graph accumulates into
    try:
        if train and rt.device.type == "cpu":
            _bind_grads(rt, c, params, st)
        if c.phase == "fwd" and keep:
            _forward_keep(rt, u, index, params, st)
        elif c.phase == "fwd":
            with torch.no_grad():
                _forward(rt, index, st)
        elif c.phase == "head":
            _head(rt, index, st)
        elif keep:
            _backward_keep(rt, u, index, st)
        else:
            _backward(rt, u, index, st)
        if train and rt.device.type != "cpu":
            _copy_grads_to_host(rt, c, params, st)
    finally:
        rt.sk.detach(list(weights))
        for p in params.values():
            p.grad = None


def _slot_of(rt, u: int) -> torch.Tensor:
    """The buffer consumer u's compute weights live in."""
    return rt.dslots[u % len(rt.dslots)] if rt.dslots else rt.stage[u % len(rt.stage)]


class WeightRefs:
    """Saved-tensor hooks of a kept forward: a tensor inside the forward's weight slot is saved as
    (byte offset, shape, stride, dtype) and rebuilt at backward time from `bwd_slot`, which holds
    the same block's weights at the same offsets; any other tensor (an activation) is saved as is."""

    def __init__(self, fwd_slot: torch.Tensor):
        self.fwd_slot = fwd_slot
        self.bwd_slot = None

    def pack(self, t: torch.Tensor):
        base, ptr = self.fwd_slot.data_ptr(), t.data_ptr()
        if t.device == self.fwd_slot.device and base <= ptr < base + self.fwd_slot.numel():
            return (ptr - base, tuple(t.shape), tuple(t.stride()), t.dtype)
        return t

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        offset, shape, stride, dtype = packed
        typed = self.bwd_slot.view(dtype)
        return torch.as_strided(typed, shape, stride, typed.storage_offset() + offset // dtype.itemsize)


def _grad_views(rt: "Runtime", block: str, st: "_StepState") -> Dict[str, torch.Tensor]:
    """The block's fp32 gradient in its gradient slot, zeroed by the step's first writer."""
    v = rt._opt_views(block)
    if block not in st.grad_started:
        v["grad"].zero_()
        st.grad_started.add(block)
    return v["grads"]


def _bind_grads(rt, c, params, st) -> None:
    # On the host device autograd accumulates straight into the gradient slot (no copy): an
    # existing .grad is accumulated into in place.
    for b in rt._grad_blocks(c):
        for name, g in _grad_views(rt, b, st).items():
            if name in params:
                params[name].grad = g.view(params[name].shape)


def _copy_grads_to_host(rt, c, params, st) -> None:
    # Synchronous copy for now; the region was zeroed by the step's first writer, so add.
    for b in rt._grad_blocks(c):
        for name, g in _grad_views(rt, b, st).items():
            p = params.get(name)
            if p is not None and p.grad is not None:
                g.add_(p.grad.detach().reshape(-1).to("cpu", torch.float32))


def _forward(rt, index: int, st) -> None:
    sk, pool = rt.sk, rt.dev_pool
    for m, mb in enumerate(st.mbs):
        if index == 0:
            h, kwargs = sk.embed_forward(mb.input_ids, mb.attention_mask)
            st.kwargs[m] = kwargs
        else:
            h = sk.layer_forward(index - 1, st.acts[(index, m)][1], st.kwargs[m])
        st.save(pool, (index + 1, m), h)
        if index in rt.plan.act_recompute:  # the plan drops this input: its backward recomputes it
            buf, _t = st.take((index, m))
            pool.free(buf)


def _forward_keep(rt, u: int, index: int, params, st) -> None:
    refs = WeightRefs(_slot_of(rt, u))
    for m in range(len(st.mbs)):
        x = st.acts[(index, m)][1].detach().requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(refs.pack, refs.unpack):
            y = rt.sk.layer_forward(index - 1, x, st.kwargs[m])
        st.graphs[(index, m)] = (x, y)
        st.save(rt.dev_pool, (index + 1, m), y.detach())
    st.refs[index] = refs
    st.fwd_params[index] = params


def _backward_keep(rt, u: int, index: int, st) -> None:
    refs = st.refs.pop(index)
    refs.bwd_slot = _slot_of(rt, u)
    for m in range(len(st.mbs)):
        x, y = st.graphs.pop((index, m))
        y.backward(st.dh[m])
        st.dh[m] = x.grad
        buf, _saved = st.take((index, m))
        rt.dev_pool.free(buf)


def _head(rt, index: int, st) -> None:
    for m, mb in enumerate(st.mbs):
        buf, saved = st.take((index, m))
        x = saved.detach().requires_grad_(True)
        loss_sum = causal_lm_loss_sum(rt.sk.head_logits(x), mb.labels)
        (loss_sum / max(st.targets, 1)).backward()
        st.dh[m] = x.grad
        st.loss_sums.append(float(loss_sum.detach()))
        rt.dev_pool.free(buf)


def _backward(rt, u: int, index: int, st) -> None:
    if index in rt.plan.act_recompute:
        _backward_from_below(rt, u, index, st)
        return
    for m, mb in enumerate(st.mbs):
        if index == 0:
            h, _ = rt.sk.embed_forward(mb.input_ids, mb.attention_mask)
            h.backward(st.dh.pop(m))
            continue
        buf, saved = st.take((index, m))
        x = saved.detach().requires_grad_(True)
        y = rt.sk.layer_forward(index - 1, x, st.kwargs[m])
        y.backward(st.dh[m])
        st.dh[m] = x.grad
        rt.dev_pool.free(buf)


def _backward_from_below(rt, u: int, index: int, st) -> None:
    """Backward of a layer whose input the forward dropped: recompute it from the layer below's
    input with that layer's weights, which sit in the next consumer's slot (the step graph made
    this compute wait for them), then backpropagate as usual."""
    below = rt._weights(u + 1)
    rt.sk.attach(below, requires_grad=False)
    try:
        for m in range(len(st.mbs)):
            with torch.no_grad():
                x = rt.sk.layer_forward(index - 2, st.acts[(index - 1, m)][1], st.kwargs[m])
            x = x.detach().requires_grad_(True)
            y = rt.sk.layer_forward(index - 1, x, st.kwargs[m])
            y.backward(st.dh[m])
            st.dh[m] = x.grad
    finally:
        rt.sk.detach(list(below))
