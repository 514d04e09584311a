"""A parameter the embed and the head block both use (a tied LM head), accumulated in the order
plain PyTorch accumulates it.

PyTorch's backward of micro-batch m sums the tied weight's two gradients first (head h_m plus
embedding e_m), then adds that into `.grad`: (h0 + e0) + (h1 + e1) + ... The layer-wise schedule
computes every head gradient before any embedding one; summed as they come, ((h0 + h1) + e0) + e1
rounds differently, and parameters whose true gradient is zero (attention key biases) turn that
rounding into visible differences after a few AdamW steps. The embedding gradient e_m is zero
outside the rows of micro-batch m's tokens, so the head's gradient is kept per micro-batch at the
rows the step's tokens touch only (tokens x hidden values each) and added in PyTorch's order when
the embedding's gradient comes; every other row is h0 + h1 + ... as before.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..model.skeleton import HEAD
from .context import RunContext, StepState


def tied_names(ctx: RunContext) -> List[str]:
    """The head's borrowed weights whose gradient is kept apart (none for a frozen base)."""
    return [] if ctx.frozen else [name for _owner, name in ctx.skeleton.block(HEAD).borrowed]


def _rows(st: StepState) -> torch.Tensor:
    if st.tied_rows is None:
        st.tied_rows = torch.unique(torch.cat([mb.input_ids.reshape(-1) for mb in st.mbs]))
    return st.tied_rows


def before_backward(params: Dict[str, torch.nn.Parameter], names: List[str]) -> Dict[str, torch.Tensor]:
    """Take the tied parameters' gradients so far aside: autograd then gives this micro-batch's alone."""
    kept = {}
    for n in names:
        if n in params:
            kept[n] = params[n].grad
            params[n].grad = None
    return kept


def after_head(st: StepState, m: int, params, kept) -> None:
    """The head's gradient of micro-batch m: its token rows kept for the embedding's, the rest summed."""
    rows = _rows(st)
    for n, acc in kept.items():
        g = params[n].grad
        st.tied_head[(n, m)] = g[rows.to(g.device)].clone()
        g[rows.to(g.device)] = 0
        params[n].grad = g if acc is None else acc.add_(g)


def after_embed(st: StepState, m: int, params, kept) -> None:
    """The embedding's gradient of micro-batch m plus the head's at its rows, then into the sum."""
    rows = _rows(st)
    for n, acc in kept.items():
        g = params[n].grad
        head = st.tied_head.pop((n, m), None)
        if head is not None:
            g.index_add_(0, rows.to(g.device), head)
        params[n].grad = g if acc is None else acc.add_(g)
