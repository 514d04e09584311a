"""The task graph of one training step, built from sizes alone.

The runtime builds it with real task bodies and runs it; the planner builds the very same graph with
no bodies and feeds it to the cost model (scheduler.costmodel) to predict a step before running it.
Slot reuse is expressed as dependencies (see runtime.py), so what the cost model simulates is
exactly what the executor will be allowed to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol

from scheduler import Graph

from ..config import BatchConfig
from ..model.skeleton import Skeleton
from ..optim.state import OPTIM_KINDS
from ..store.store import Store


# One thread per lane: the executor and the cost model both run the step graph with these.
LANES = {"read": 1, "write": 1, "h2d": 1, "d2h": 1, "compute": 1, "optim": 1, "commit": 1}


@dataclass(frozen=True)
class Consumer:
    """One use of weights by the compute lane: phase 'fwd', 'head' (forward+backward) or 'bwd'."""

    phase: str
    block: str
    weight_blocks: tuple  # blocks whose weights files it reads (own first, then borrowed)


def consumers(block_names: List[str], borrowed: dict) -> List[Consumer]:
    """Weight uses in compute order: forward embed..layers, head (fwd+bwd fused), backward layers..embed."""
    embed, *layers, head = block_names
    out = [Consumer("fwd", b, (b,)) for b in [embed] + layers]
    out.append(Consumer("head", head, (head,) + tuple(borrowed.get(head, ()))))
    out += [Consumer("bwd", b, (b,)) for b in reversed([embed] + layers)]
    return out


def model_consumers(store: Store, skeleton) -> List[Consumer]:
    borrowed = {b.name: tuple(owner for owner, _ in b.borrowed) for b in skeleton.blocks}
    return consumers(store.block_names, borrowed)


@dataclass(frozen=True)
class BlockSizes:
    numel: int
    weights_bytes: int  # one read of the stored compute weights
    states_bytes: int  # master + moments, read once and written once per step


@dataclass(frozen=True)
class StepSpec:
    cons: List[Consumer]
    blocks: Dict[str, BlockSizes]
    weight_slots: int
    device_slots: int
    opt_slots: int
    opt_owner: Dict[str, int]  # block -> optimizer slot index (-1: a dedicated slot)
    flops: List[int]  # per consumer
    grad_slots: int = 2  # gradient slots the backward cycles through (blocks with a dedicated optimizer slot have their own)
    cached: frozenset = frozenset()  # blocks held in the host block cache: their reads are memory copies
    act_offload: int = 0  # inputs of layers 1..act_offload go to the host after their forward (see plan.py)
    act_recompute: frozenset = frozenset()  # layers whose inputs are recomputed in the backward (see plan.py)
    act_ssd: int = 0  # offloaded inputs of layers 1..act_ssd go to the store's disk, not host memory
    act_block_bytes: int = 0  # one block's inputs, every micro-batch


def block_indices(cons: List[Consumer]) -> Dict[str, int]:
    """Block index of each block in the forward (0 = embedding, 1..L = layers), as the saved
    inputs (i, micro-batch) and the plan's activation placement count them."""
    return {c.block: i for i, c in enumerate(c for c in cons if c.phase == "fwd")}


def _previous_holders(order: List[str], owner: Dict[str, int], slots: int) -> Dict[str, str]:
    """block -> the block that used its (cycled) slot before it, in `order`."""
    cyc = [b for b in order if owner[b] >= 0]
    return {cyc[i]: cyc[i - slots] for i in range(slots, len(cyc))}


class TaskBodies(Protocol):
    def read_weights(self, u: int) -> Callable[[], object]: ...
    def h2d(self, u: int) -> Callable[[], object]: ...
    def compute(self, u: int) -> Callable[[], object]: ...
    def read_states(self, b: str) -> Callable[[], object]: ...
    def optim(self, b: str) -> Callable[[], object]: ...
    def write(self, b: str) -> Callable[[], object]: ...
    def read_grad(self, b: str) -> Callable[[], object]: ...
    def act_out(self, i: int) -> Callable[[], object]: ...
    def act_in(self, i: int) -> Callable[[], object]: ...


def _noop() -> None:
    return None


class NoBodies:
    """Bodies that do nothing: the graph's shape and sizes only (for the cost model)."""

    def __getattr__(self, _name):
        return lambda *_a: _noop


def assign_opt_slots(cons: List[Consumer], tied: bool, opt_slots: int, embed: str) -> Dict[str, int]:
    """Blocks in backward order cycle through the optimizer slots; a tied embedding keeps its own
    (the head's backward writes into its gradient long before the embedding's backward does)."""
    out, i = {}, 0
    for c in cons:
        if c.phase == "fwd":
            continue
        if tied and c.block == embed:
            out[c.block] = -1
            continue
        out[c.block] = i % opt_slots
        i += 1
    return out


def consumer_flops(
    c: Consumer, blocks: Dict[str, BlockSizes], *, tokens: int, seq_len: int, hidden: int, is_layer: bool, recompute: bool = True
) -> int:
    """Model FLOPs of a consumer: 2·params·tokens per matmul pass, plus causal attention for layers;
    a backward is twice the forward, plus a recompute of the forward unless the forward kept its
    activations; the head runs forward and backward."""
    numel = sum(blocks[b].numel for b in c.weight_blocks)
    if not is_layer and c.phase != "head":
        return 0  # the embedding is a gather
    fwd = 2 * numel * tokens + (2 * seq_len * hidden * tokens if is_layer else 0)
    return {"fwd": fwd, "head": 3 * fwd, "bwd": (3 if recompute or not is_layer else 2) * fwd}[c.phase]


def build_step_graph(spec: StepSpec, bodies: Optional[TaskBodies] = None) -> Graph:
    bodies = bodies or NoBodies()
    g = Graph()
    W, D, O = spec.weight_slots, spec.device_slots, spec.opt_slots
    if spec.act_recompute and (W < 2 or D == 1):
        raise ValueError("recomputed block inputs need two weight slots (and two device slots when there are any)")
    compute, ready, writes, optims = [], {}, {}, {}
    order = [c.block for c in spec.cons if c.phase != "fwd" and spec.blocks[c.block].numel]
    opt_free = _previous_holders(order, spec.opt_owner, O)  # freed by that block's write
    grad_free = _previous_holders(order, spec.opt_owner, spec.grad_slots)  # freed by that block's optimizer
    index = block_indices(spec.cons)
    act_out, bwd_done = {}, {}

    def weights_ready(u: int):
        """The task after which consumer u's weights sit in its slot (added once)."""
        if u in ready:
            return ready[u]
        c = spec.cons[u]
        stage_bytes = sum(spec.blocks[b].weights_bytes for b in c.weight_blocks)
        copied = sum(spec.blocks[b].weights_bytes for b in c.weight_blocks if b in spec.cached)
        release = (ready[u - W] if D else compute[u - W]) if u >= W else None
        # nbytes: what the store reads; copy_bytes: what comes from the block cache instead.
        read = g.add(f"read_w{u}:{c.block}", "read", "read", bodies.read_weights(u), [release], nbytes=stage_bytes - copied, block=c.block, copy_bytes=copied)
        if D:
            dev_free = compute[u - D] if u >= D else None
            read = g.add(f"h2d{u}:{c.block}", "h2d", "h2d", bodies.h2d(u), [read, dev_free], nbytes=stage_bytes, block=c.block)
        ready[u] = read
        return read

    for u, c in enumerate(spec.cons):
        read = weights_ready(u)
        deps = [read, compute[-1] if compute else None]
        i = index.get(c.block, -1)
        if c.phase == "bwd" and i in spec.act_recompute:
            # Its input is recomputed from the layer below, whose weights (the next consumer's) must
            # be in their slot already (the plan keeps two slots then, so nothing waits on this compute).
            deps.append(weights_ready(u + 1))
        if c.phase != "fwd":
            deps += [optims[grad_free[b]] for b in c.weight_blocks if b in grad_free]
        if c.phase == "fwd" and i - 2 in act_out:
            deps.append(act_out[i - 2])  # at most three offloaded inputs on the device in the forward
        if c.phase == "bwd" and 1 <= i <= spec.act_offload:
            # Back just before the backward that needs it, once the one two blocks later has freed its own.
            lane = "read" if i <= spec.act_ssd else "h2d"
            back = g.add(f"act_in{i}:{c.block}", lane, lane, bodies.act_in(i), [act_out[i], bwd_done.get(i + 2)], nbytes=spec.act_block_bytes, block=c.block)
            deps.append(back)
        extra = {"from_below": True} if c.phase == "bwd" and i in spec.act_recompute else {}  # kept in the trace for the profiler
        compute.append(g.add(f"{c.phase}:{c.block}", "compute", "compute", bodies.compute(u), deps, flops=spec.flops[u], block=c.block, phase=c.phase, **extra))
        if c.phase == "fwd" and 1 <= i <= spec.act_offload:
            lane = "write" if i <= spec.act_ssd else "d2h"
            act_out[i] = g.add(f"act_out{i}:{c.block}", lane, lane, bodies.act_out(i), [compute[-1]], nbytes=spec.act_block_bytes, block=c.block)
        if c.phase == "bwd":
            bwd_done[i] = compute[-1]
        if c.phase != "fwd" and spec.blocks[c.block].numel:
            b, size = c.block, spec.blocks[c.block]
            prev = writes[opt_free[b]] if b in opt_free else None
            hit = b in spec.cached
            rs = g.add(f"read_s:{b}", "read", "read", bodies.read_states(b), [prev], nbytes=0 if hit else size.states_bytes, block=b,
                       copy_bytes=size.states_bytes if hit else 0)
            op = g.add(f"optim:{b}", "optim", "optim", bodies.optim(b), [compute[-1], rs], nbytes=2 * size.states_bytes + size.weights_bytes + 4 * size.numel, block=b, numel=size.numel)
            optims[b] = op
            writes[b] = g.add(f"write:{b}", "write", "write", bodies.write(b), [op], nbytes=size.states_bytes + size.weights_bytes, block=b)
    return g


def build_redo_graph(spec: StepSpec, bodies: Optional[TaskBodies] = None) -> Graph:
    """The optimizer pass again, from the live (old) states and the kept gradients (a clipped step)."""
    bodies = bodies or NoBodies()
    g = Graph()
    order = [c.block for c in spec.cons if c.phase != "fwd" and spec.blocks[c.block].numel]
    opt_free = _previous_holders(order, spec.opt_owner, spec.opt_slots)
    grad_free = _previous_holders(order, spec.opt_owner, spec.grad_slots)
    writes, optims = {}, {}
    for b in order:
        size = spec.blocks[b]
        rs = g.add(f"redo_read_s:{b}", "read", "read", bodies.read_states(b), [writes.get(opt_free.get(b))], nbytes=size.states_bytes, block=b)
        rg = g.add(f"redo_read_g:{b}", "read", "read", bodies.read_grad(b), [optims.get(grad_free.get(b))], nbytes=4 * size.numel, block=b)
        op = g.add(f"redo_optim:{b}", "optim", "optim", bodies.optim(b), [rs, rg], nbytes=2 * size.states_bytes + size.weights_bytes + 4 * size.numel, block=b, numel=size.numel)
        optims[b] = op
        writes[b] = g.add(f"redo_write:{b}", "write", "write", bodies.write(b), [op], nbytes=size.states_bytes + size.weights_bytes, block=b)
    return g


def step_spec(store: Store, cons: List[Consumer], plan, opt_owner: Dict[str, int], skeleton: Skeleton, batch: BatchConfig) -> StepSpec:
    """Sizes of every task of a step, from the store's layout and the model's shape."""
    blocks = {
        b: BlockSizes(lay.numel, lay.kinds["weights"].nbytes, sum(lay.kinds[k].nbytes for k in OPTIM_KINDS)) for b, lay in store.layouts.items()
    }
    cfg = skeleton.config
    tokens = batch.batch_size * batch.seq_len
    flops = [
        consumer_flops(
            c, blocks, tokens=tokens, seq_len=batch.seq_len, hidden=cfg.hidden_size, is_layer=skeleton.block(c.block).is_layer, recompute=plan.recompute
        )
        for c in cons
    ]
    # A layer whose input is recomputed also runs the forward of the layer below (block index i - 1,
    # the i-1-th consumer) in its backward.
    index = block_indices(cons)
    for u, c in enumerate(cons):
        if c.phase == "bwd" and index[c.block] in plan.act_recompute:
            flops[u] += flops[index[c.block] - 1]
    return StepSpec(
        cons, blocks, plan.weight_slots, plan.device_slots, plan.opt_slots, opt_owner, flops, plan.grad_slots, frozenset(plan.cache_blocks),
        act_offload=plan.act_offload, act_block_bytes=plan.micro_batches * plan.act_bytes, act_recompute=frozenset(plan.act_recompute),
        act_ssd=plan.act_ssd,
    )
