"""The compute lane's work for one consumer: attach a block's weights, run its micro-batches, detach.

The numerics of a step, in one place; the slots and the order of work are the runtime's and the graph's.
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

from typing import Dict

import torch

from ..model.skeleton import causal_lm_loss_sum
from . import sides, tied
from .context import RunContext, StepState


def run_consumer(ctx: RunContext, consumer: int, st: StepState) -> None:
    c, sk = ctx.cons[consumer], ctx.skeleton
    index = sk.block(c.block).index
    if st.evaluating:
        _evaluate(ctx, consumer, index, st)
        return
    keep = not ctx.plan.recompute and sk.block(c.block).is_layer
    weights = ctx.slots.weights(consumer)
    train = c.phase != "fwd" and not ctx.frozen  # a frozen base's weights get no gradient (its adapters do)
    sk.on_grad = st.received.add  # which parameters autograd reaches this step (bodies.optim)
    params = sk.attach(weights, requires_grad=train or (keep and not ctx.frozen))
    if keep and c.phase == "bwd":
        params = st.fwd_params.pop(index)  # the Parameters the kept graph accumulates into
    try:
        if train and ctx.device.type == "cpu":
            _bind_grads(ctx, c, params, st)
        if c.phase == "fwd" and keep:
            _forward_keep(ctx, consumer, index, params, st)
        elif c.phase == "fwd":
            with torch.no_grad():
                _forward(ctx, index, st)
        elif c.phase == "head":
            _head(ctx, index, params, st)
        elif keep:
            _backward_keep(ctx, consumer, index, st)
        else:
            _backward(ctx, consumer, index, params, st)
        if train and ctx.device.type != "cpu":
            _copy_grads_to_host(ctx, c, params, st)
        elif train:
            _copy_grads_to_host(ctx, c, {n: params[n] for n in tied.tied_names(ctx) if n in params}, st)
    finally:
        sk.detach(list(weights))
        for p in params.values():
            p.grad = None


@torch.no_grad()
def _evaluate(ctx: RunContext, consumer: int, index: int, st: StepState) -> None:
    """A consumer of the forward-only pass: the forward of its block, or the head's loss; each
    block input is freed once the block has read it."""
    sk, c = ctx.skeleton, ctx.cons[consumer]
    weights = ctx.slots.weights(consumer)
    sk.attach(weights, requires_grad=False)
    try:
        if c.phase == "head":
            for m, mb in enumerate(st.mbs):
                buf, x = ctx.acts.take((index, m))
                st.loss_sums.append(float(causal_lm_loss_sum(sk.head_logits(x), mb.labels)))
                ctx.acts.release(buf)
        else:
            _forward(ctx, index, st)
    finally:
        sk.detach(list(weights))


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


def started_grad(ctx: RunContext, block: str, st: StepState) -> torch.Tensor:
    """The block's flat fp32 gradient in its gradient slot, zeroed by the step's first user (a
    backward accumulating into it, or a reduce to which this rank adds nothing)."""
    grad = ctx.slots.grad(block)
    if block not in st.grad_started:
        grad.zero_()
        st.grad_started.add(block)
    return grad


def _grad_views(ctx: RunContext, block: str, st: StepState) -> Dict[str, torch.Tensor]:
    """The block's fp32 gradient in its gradient slot, per parameter (zeroed by the step's first user)."""
    started_grad(ctx, block, st)
    return ctx.slots.grad_views(block)


def _bind_grads(ctx: RunContext, c, params, st: StepState) -> None:
    # On the host device autograd accumulates straight into the gradient slot (no copy): an
    # existing .grad is accumulated into in place. A tied parameter is summed in tied.py's order
    # and added once the consumer ends.
    skip = set(tied.tied_names(ctx))
    for b in ctx.grad_blocks(c):
        for name, g in _grad_views(ctx, b, st).items():
            if name in params and name not in skip:
                params[name].grad = g.view(params[name].shape)


def _copy_grads_to_host(ctx: RunContext, c, params, st: StepState) -> None:
    # A synchronous copy: the gradient slot is handed to the optimizer lane as soon as this consumer
    # ends. The region was zeroed by the step's first writer, so add (a tied head and embedding
    # both write into the embedding's gradient).
    for b in ctx.grad_blocks(c):
        for name, g in _grad_views(ctx, b, st).items():
            p = params.get(name)
            if p is not None and p.grad is not None:
                g.add_(p.grad.detach().reshape(-1).to("cpu", torch.float32))


def _forward(ctx: RunContext, index: int, st: StepState) -> None:
    sk, acts = ctx.skeleton, ctx.acts
    for m, mb in enumerate(st.mbs):
        if index == 0:
            h, kwargs = sk.embed_forward(mb.input_ids, mb.attention_mask)
            st.kwargs[m] = kwargs
        else:
            h = sk.layer_forward(index - 1, acts.get((index, m)), st.kwargs[m])
        acts.save((index + 1, m), h)
        if index in ctx.plan.recomputed_inputs or (st.evaluating and index > 0):  # dropped: recomputed in the backward, or none
            buf, _t = acts.take((index, m))
            acts.release(buf)


def _forward_keep(ctx: RunContext, consumer: int, index: int, params, st: StepState) -> None:
    refs = WeightRefs(ctx.slots.compute_slot(consumer))
    for m in range(len(st.mbs)):
        x = ctx.acts.get((index, m)).detach().requires_grad_(True)
        got = sides.leaves(ctx.skeleton, index - 1, st.kwargs[m])
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(refs.pack, refs.unpack):
            y, extra, stored = ctx.skeleton.layer_call(index - 1, x, st.kwargs[m], got, carry=True)
        ctx.skeleton.carry(index - 1, extra, st.kwargs[m])
        st.graphs[(index, m)] = (x, y, extra, stored, got)
        ctx.acts.save((index + 1, m), y.detach())
    st.refs[index] = refs
    st.fwd_params[index] = params


def _backward_keep(ctx: RunContext, consumer: int, index: int, st: StepState) -> None:
    refs = st.refs.pop(index)
    refs.bwd_slot = ctx.slots.compute_slot(consumer)
    for m in range(len(st.mbs)):
        x, y, extra, stored, got = st.graphs.pop((index, m))
        sides.backward(ctx.skeleton, index - 1, y, extra, stored, st.out_grads[m], st, m)
        sides.keep(ctx.skeleton, index - 1, got, st.kwargs[m], st, m)
        st.out_grads[m] = x.grad
        buf, _saved = ctx.acts.take((index, m))
        ctx.acts.release(buf)


def _head(ctx: RunContext, index: int, params, st: StepState) -> None:
    for m, mb in enumerate(st.mbs):
        buf, saved = ctx.acts.take((index, m))
        x = saved.detach().requires_grad_(True)
        loss_sum = causal_lm_loss_sum(ctx.skeleton.head_logits(x), mb.labels)
        kept = tied.before_backward(params, tied.tied_names(ctx))
        (loss_sum / max(st.targets, 1)).backward()
        tied.after_head(st, m, params, kept)
        st.out_grads[m] = x.grad
        st.loss_sums.append(float(loss_sum.detach()))
        ctx.acts.release(buf)


def _backward(ctx: RunContext, consumer: int, index: int, params, st: StepState) -> None:
    if index in ctx.plan.recomputed_inputs:
        _backward_from_below(ctx, consumer, index, st)
        return
    sk = ctx.skeleton
    for m, mb in enumerate(st.mbs):
        if index == 0:
            h, inputs = sk.embed_forward(mb.input_ids, mb.attention_mask)
            roots, grads = sides.embed_roots(inputs, st, m)
            kept = tied.before_backward(params, tied.tied_names(ctx))
            torch.autograd.backward([h] + roots, [st.out_grads.pop(m)] + grads)
            tied.after_embed(st, m, params, kept)
            continue
        buf, saved = ctx.acts.take((index, m))
        x = saved.detach().requires_grad_(True)
        _layer_backward(sk, index - 1, x, st, m)
        ctx.acts.release(buf)


def _layer_backward(sk, layer: int, x: torch.Tensor, st: StepState, m: int) -> None:
    """Recompute decoder layer `layer` from its input x with autograd, then backpropagate it."""
    got = sides.leaves(sk, layer, st.kwargs[m])
    y, extra, stored = sk.layer_call(layer, x, st.kwargs[m], got)
    sides.backward(sk, layer, y, extra, stored, st.out_grads[m], st, m)
    sides.keep(sk, layer, got, st.kwargs[m], st, m)
    st.out_grads[m] = x.grad


def _backward_from_below(ctx: RunContext, consumer: int, index: int, st: StepState) -> None:
    """Backward of a layer whose input the forward dropped: recompute it from the layer below's
    input with that layer's weights, which sit in the next consumer's slot (the step graph made
    this compute wait for them), then backpropagate as usual."""
    sk = ctx.skeleton
    below = ctx.slots.weights(consumer + 1)
    sk.attach(below, requires_grad=False)
    try:
        for m in range(len(st.mbs)):
            with torch.no_grad():
                x, _extra, _stored = sk.layer_call(index - 2, ctx.acts.get((index - 1, m)), st.kwargs[m])
            _layer_backward(sk, index - 1, x.detach().requires_grad_(True), st, m)
    finally:
        sk.detach(list(below))
