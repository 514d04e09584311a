"""What each task of the step graph runs: one method per task kind, over the run's context and the
step's shared state. The graph binds each method to its consumer, block b or layer i
(graph.build_step_graph); slot reuse is already ordered by the graph's dependencies, so a body
never waits for memory."""
from __future__ import annotations

import contextlib

import torch

from ..faults import crash_point
from ..model.errors import UnsupportedModelError
from ..optim.state import OPTIM_KINDS, adamw_update_, emit_weights_
from .compute import run_consumer, started_grad
from .context import RunContext, StepState
from .slot_sizes import SLOT_KINDS


class StepBodies:
    def __init__(self, ctx: RunContext, st: StepState):
        self.ctx, self.st = ctx, st

    def read_weights(self, consumer: int) -> None:
        """The consumer's weights files into its staging slot (from the block cache where it holds them)."""
        for block, region in self.ctx.slots.staging_regions(consumer):
            self.ctx.cache.read(block, "weights", region)

    def h2d(self, consumer: int) -> None:
        """Staging slot -> device slot, decoded (fp8 dequantized, upcast) here rather than on the compute lane."""
        slots, stream = self.ctx.slots, self.ctx.streams.get("h2d")
        src, dst = slots.staged_weights(consumer), slots.device_weights(consumer)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for name, t in src.items():
                dst[name].copy_(t, non_blocking=stream is not None)
        if stream is not None:
            stream.synchronize()  # the staging slot is reused as soon as this task ends
        self.ctx.moved.add("cpu->gpu", sum(t.numel() * t.element_size() for t in src.values()))

    def compute(self, consumer: int) -> None:
        run_consumer(self.ctx, consumer, self.st)
        if self.ctx.device.type == "cuda":
            torch.cuda.current_stream(self.ctx.device).synchronize()  # slots are reused once this task ends

    def read_states(self, b: str) -> None:
        """Block b's live master and moments into its optimizer slot (none: another rank updates b)."""
        if b in self.st.done_blocks:
            return  # lean mode, resumed step: this block's update is live already
        for k in OPTIM_KINDS:
            if k in self.ctx.store.layouts[b].kinds:
                self.ctx.cache.read(b, k, self.ctx.slots.optimizer_region(b, k))

    def optim(self, b: str) -> None:
        """AdamW on block b from its gradient slot; the first pass also measures the gradient norms."""
        crash_point("optim")
        ctx, st = self.ctx, self.st
        if not ctx.owns(b):
            return  # another rank updates b; its new weights arrive by broadcast_weights
        if st.grad_scale == 1.0:  # a redo (clipping) reuses the first pass's norms
            if not self._first_pass_checks(b):
                return
        # The weights region is only written part by part: zero its alignment gaps first, so they hold
        # zeros, not what an earlier block left in the slot (the files' bytes are then a function of
        # the state alone); the update writes every part's bytes.
        ctx.store.layouts[b].kinds["weights"].zero_gaps(ctx.slots.optimizer_region(b, "weights"))
        views, grads, lay, o = ctx.slots.optimizer_views(b), ctx.slots.grad_views(b), ctx.store.layouts[b], ctx.optim
        for name, numel in lay.params:
            parts = {k: views[k][name] for k in views}
            if not self._has_grad(name):  # torch.optim.AdamW skips a parameter without a gradient
                emit_weights_(ctx.store.state.cfg, parts, numel, lay.shapes[name])
                continue
            adamw_update_(ctx.store.state.cfg, grads[name], parts, step=st.step, lr=st.lr, shape=lay.shapes[name], beta1=o.beta1, beta2=o.beta2,
                          eps=o.eps, weight_decay=o.weight_decay, grad_scale=st.grad_scale)

    def _has_grad(self, name: str) -> bool:
        """Whether autograd reached the parameter this step. One the forward never uses keeps its
        value and moments, as in torch.optim.AdamW; one used in some steps only is refused, since
        AdamW then counts that parameter's steps apart from the others'."""
        got = name in self.st.received
        if self.ctx.had_grad.setdefault(name, got) != got:
            raise UnsupportedModelError(
                f"parameter {name} got a gradient in one step and none in another (e.g. an expert no token was routed to); "
                "torch.optim.AdamW then counts its steps apart, which fuyou does not: train on batches that use every parameter"
            )
        return got

    def _first_pass_checks(self, b: str) -> bool:
        """Record b's gradient norms (and keep its gradient for a clipped redo); False: skip its update."""
        ctx, st = self.ctx, self.st
        # Only parameters with a gradient count, as in clip_grad_norm_ (the others have none there).
        norms = {name: torch.linalg.vector_norm(g) for name, g in ctx.slots.grad_views(b).items() if name in st.received}
        st.add_norms(norms)
        if ctx.max_grad_norm is not None:
            # Kept until the commit: a clipped step is redone from these and the old states.
            # Written here, before the gradient slot is handed to the next block.
            ctx.store.write(b, "grad", ctx.slots.grad(b), version=st.step)
        if b in st.done_blocks:
            return False  # lean mode, resumed step: this block's update is live already
        if ctx.disk_mode == "lean" and not all(bool(torch.isfinite(n)) for n in norms.values()):
            raise FloatingPointError(
                f"non-finite gradient in {b} at step {st.step}; lean disk mode cannot skip a step whose other blocks may be "
                "updated already: lower --lr or fix the data, or train with --disk-mode safe"
            )
        return True

    def write(self, b: str) -> None:
        """Block b's new master, moments and weights (only weights: another rank updates b) as
        version-`step` files, then into the cache."""
        ctx, step = self.ctx, self.st.step
        if b in self.st.done_blocks:
            return
        kinds = [k for k in SLOT_KINDS if k in ctx.store.layouts[b].kinds]
        for k in kinds:
            ctx.store.write(b, k, ctx.slots.optimizer_region(b, k), version=step)
        ctx.cache.keep(b, ctx.slots.slot_bytes(b), step)
        if ctx.disk_mode == "lean":
            ctx.store.commit_block(b, step, kinds)

    def read_grad(self, b: str) -> None:
        """Block b's kept gradient back into its gradient slot (a clipped step's redo)."""
        if self.ctx.owns(b):  # only the owner kept it: the others do not update b
            self.ctx.store.read(b, "grad", self.ctx.slots.grad(b).view(torch.uint8), version=self.st.step)

    def reduce_grad(self, b: str) -> None:
        """Ranks: block b's gradient summed over the ranks into its owner's gradient slot; the
        parameters any rank's autograd reached count as received on every rank (so every rank
        agrees on which parameters have a gradient, as one process accumulating every row would)."""
        ctx, st = self.ctx, self.st
        grad = started_grad(ctx, b, st)  # zeros where this rank's rows reached nothing in b
        ctx.group.reduce_(grad, ctx.owners[b])
        ctx.moved.add("between ranks", grad.numel() * grad.element_size())
        names = [name for name, _numel in ctx.store.layouts[b].params]
        got = ctx.group.all_reduce_(torch.tensor([name in st.received for name in names], dtype=torch.int64), "max")
        st.received.update(name for name, g in zip(names, got.tolist()) if g)

    def broadcast_weights(self, b: str) -> None:
        """Ranks: block b's new compute weights, as its file holds them, from its owner's optimizer
        slot into every other rank's (whose write then stores them). The alignment gaps are zero on
        every rank (the owner's optimizer zeroes its own), so the files are alike byte for byte."""
        ctx = self.ctx
        region, kind = ctx.slots.optimizer_region(b, "weights"), ctx.store.layouts[b].kinds["weights"]
        if not ctx.owns(b):
            kind.zero_gaps(region)
        ctx.group.broadcast_(region[: kind.nbytes], ctx.owners[b])
        ctx.moved.add("between ranks", kind.nbytes)

    def act_out(self, i: int) -> None:
        self.ctx.acts.offload(i, len(self.st.mbs))

    def act_in(self, i: int) -> None:
        self.ctx.acts.bring_back(i, len(self.st.mbs))
