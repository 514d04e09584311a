"""The compute lane's work for one consumer: attach a block's weights, run its micro-batches, detach.

Kept apart from runtime.py (graph and slots) so the numerics of a step can be read in one place.
Block indices: 0 = embedding, 1..L = decoder layers, L+1 = head; saved activation (i, m) is the
input of block i for micro-batch m.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch

from .model.skeleton import causal_lm_loss_sum

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Runtime, _StepState


def run_consumer(rt: "Runtime", u: int, st: "_StepState") -> None:
    c = rt.cons[u]
    weights = rt._weights(u)
    train = c.phase != "fwd"
    params = rt.sk.attach(weights, requires_grad=train)
    try:
        if train and rt.device.type == "cpu":
            _bind_grads(rt, c, params, st)
        index = rt.sk.block(c.block).index
        if c.phase == "fwd":
            with torch.no_grad():
                _forward(rt, index, st)
        elif c.phase == "head":
            _head(rt, index, st)
        else:
            _backward(rt, index, st)
        if train and rt.device.type != "cpu":
            _copy_grads_to_host(rt, c, params, st)
    finally:
        rt.sk.detach(list(weights))
        for p in params.values():
            p.grad = None


def _grad_views(rt: "Runtime", block: str, st: "_StepState") -> Dict[str, torch.Tensor]:
    """The block's fp32 gradient region in its optimizer slot, zeroed by the step's first writer."""
    v = rt._opt_views(block)
    if block not in st.grad_started:
        v["grad"].zero_()
        st.grad_started.add(block)
    return v["grads"]


def _bind_grads(rt, c, params, st) -> None:
    # On the host device autograd accumulates straight into the optimizer slot (no copy): an
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


def _head(rt, index: int, st) -> None:
    for m, mb in enumerate(st.mbs):
        buf, saved = st.take((index, m))
        x = saved.detach().requires_grad_(True)
        loss_sum = causal_lm_loss_sum(rt.sk.head_logits(x), mb.labels)
        (loss_sum / max(st.targets, 1)).backward()
        st.dh[m] = x.grad
        st.loss_sums.append(float(loss_sum.detach()))
        rt.dev_pool.free(buf)


def _backward(rt, index: int, st) -> None:
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
