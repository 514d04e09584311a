"""What one training step is made of, before any task exists: the consumers of weights in compute
order, the sizes of every block, and the step's shape (`StepSpec`): the slots the memory plan
gives, which blocks are cached, where block inputs go, how many ranks share the step. graph.py
builds the task graph from it; the planner and the profiler build the same from theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import BatchConfig
from ..model.skeleton import Skeleton
from ..optim.codecs import weights_codec
from ..optim.state import OPTIM_KINDS
from ..store.store import Store


@dataclass(frozen=True)
class Consumer:
    """One use of weights by the compute lane: phase 'fwd', 'head' (forward+backward) or 'bwd'."""

    phase: str
    block: str
    weight_blocks: tuple  # blocks whose weights files it reads (own first, then borrowed)


def consumers(block_names: List[str], borrowed: dict, frozen: bool = False) -> List[Consumer]:
    """Weight uses in compute order: forward embed..layers, head (fwd+bwd fused), backward layers..embed
    (a frozen base has no backward of the embedding: nothing below the layers is trained)."""
    embed, *layers, head = block_names
    out = [Consumer("fwd", b, (b,)) for b in [embed] + layers]
    out.append(Consumer("head", head, (head,) + tuple(borrowed.get(head, ()))))
    out += [Consumer("bwd", b, (b,)) for b in reversed(layers if frozen else [embed] + layers)]
    return out


def model_consumers(store: Store, skeleton, frozen: bool = False) -> List[Consumer]:
    borrowed = {b.name: tuple(owner for owner, _ in b.borrowed) for b in skeleton.blocks}
    return consumers(store.block_names, borrowed, frozen)


@dataclass(frozen=True)
class BlockSizes:
    numel: int
    weights_bytes: int  # one read of the stored compute weights
    states_bytes: int  # master + moments, read once and written once per step
    values_bytes: Optional[int] = None  # the weights as the h2d lane copies them (decoded); None: as stored

    @property
    def copied_bytes(self) -> int:
        return self.weights_bytes if self.values_bytes is None else self.values_bytes


@dataclass(frozen=True)
class StepSpec:
    cons: List[Consumer]
    blocks: Dict[str, BlockSizes]
    weight_slots: int
    device_slots: int
    opt_slots: int
    opt_owner: Dict[str, int]  # block -> optimizer slot index (-1: the edge slot, see assign_opt_slots)
    flops: List[int]  # per consumer
    grad_slots: int  # gradient slots the backward cycles through (the edge blocks share one of their own)
    cached: frozenset = frozenset()  # blocks held in the host block cache: their reads are memory copies
    n_offloaded: int = 0  # inputs of layers 1..n_offloaded go to the host after their forward (see memory_plan.py)
    recomputed_inputs: frozenset = frozenset()  # layers whose inputs are recomputed in the backward (see memory_plan.py)
    n_on_ssd: int = 0  # offloaded inputs of layers 1..n_on_ssd go to the store's disk, not host memory
    act_block_bytes: int = 0  # one block's inputs, every micro-batch
    train_states: bool = True  # False: a frozen base (LoRA): no optimizer, state reads or writes
    ranks: int = 1  # data-parallel ranks: above 1, each block's gradient is reduced to its owner and its new weights broadcast
    keeps_grads: bool = False  # clipping: each block's first optimizer pass writes its gradient to the store for a clipped redo
    kept_forward: bool = False  # the forward keeps each layer's autograd activations (no recompute in the backward)
    weights_codec: str = "fp32"  # how the compute weights are stored (the h2d lane decodes them)


def block_indices(cons: List[Consumer]) -> Dict[str, int]:
    """Block index of each block in the forward (0 = embedding, 1..L = layers), as the saved
    inputs (i, micro-batch) and the plan's activation placement count them."""
    return {c.block: i for i, c in enumerate(c for c in cons if c.phase == "fwd")}


def assign_opt_slots(cons: List[Consumer], edge_blocks: tuple, opt_slots: int) -> Dict[str, int]:
    """Blocks in backward order cycle through the optimizer slots; the edge blocks (the memory
    plan's `edge_blocks`: a tied embedding, or the untied head and embedding) share one slot of
    their own instead, -1, in backward order too."""
    out, i = {}, 0
    for c in cons:
        if c.phase == "fwd":
            continue
        if c.block in edge_blocks:
            out[c.block] = -1
            continue
        out[c.block] = i % opt_slots
        i += 1
    return out


def consumer_flops(
    c: Consumer, blocks: Dict[str, BlockSizes], *, tokens: int, seq_len: int, hidden: int, is_layer: bool, recompute: bool = True,
    frozen: bool = False,
) -> int:
    """Model FLOPs of a consumer: 2·params·tokens per matmul pass, plus causal attention for layers;
    a backward is twice the forward (once for a frozen base: the input's gradient, no weights'),
    plus a recompute of the forward unless the forward kept its activations; the head runs forward
    and backward."""
    numel = sum(blocks[b].numel for b in c.weight_blocks)
    if not is_layer and c.phase != "head":
        return 0  # the embedding is a gather
    fwd = 2 * numel * tokens + (2 * seq_len * hidden * tokens if is_layer else 0)
    back = 1 if frozen else 2
    return {"fwd": fwd, "head": (1 + back) * fwd, "bwd": (back + (1 if recompute or not is_layer else 0)) * fwd}[c.phase]


def compute_work(phase: str, index: int, kept_forward: bool) -> str:
    """The kind of work a compute task does, for rates measured per kind (Rates.compute_by_work):
    the embedding's forward or backward (a gather), the head (forward, loss and backward), a
    decoder layer's forward or backward as the backward does it (from the forward's kept
    activations, or recomputing), or a forward-only pass (validation). `index`: the block's (0 =
    embedding, -1 = head)."""
    if index < 0:
        return "eval:head" if phase == "eval" else "head"
    if index == 0:
        return f"embed:{phase}"
    if phase == "eval":
        return "eval:layer"
    return f"layer:{phase}:{'keep' if kept_forward else 'recompute'}"


def step_spec(store: Store, cons: List[Consumer], plan, opt_owner: Dict[str, int], skeleton: Skeleton, batch: BatchConfig,
              ranks: int = 1, keeps_grads: bool = False) -> StepSpec:
    """Sizes of every task of a step, from the store's layout and the model's shape (one rank's:
    `batch` is its rows, the store its own). `keeps_grads`: the run clips gradients."""
    codec = store.state.cfg.weights
    blocks = {
        b: BlockSizes(lay.numel, lay.kinds["weights"].nbytes, sum(lay.kinds[k].nbytes for k in OPTIM_KINDS if k in lay.kinds),
                      sum(weights_codec(codec, n, lay.shapes[name]).values_bytes(n) for name, n in lay.params))
        for b, lay in store.layouts.items()
    }
    cfg = skeleton.config
    tokens = batch.batch_size * batch.seq_len
    flops = [
        consumer_flops(
            c, blocks, tokens=tokens, seq_len=batch.seq_len, hidden=cfg.hidden_size, is_layer=skeleton.block(c.block).is_layer, recompute=plan.recompute,
            frozen=plan.opt_slots == 0,
        )
        for c in cons
    ]
    # A layer whose input is recomputed also runs the forward of the layer below (block index i - 1,
    # the i-1-th consumer) in its backward.
    index = block_indices(cons)
    for consumer, c in enumerate(cons):
        if c.phase == "bwd" and index[c.block] in plan.recomputed_inputs:
            flops[consumer] += flops[index[c.block] - 1]
    return StepSpec(
        cons, blocks, plan.weight_slots, plan.device_slots, plan.opt_slots, opt_owner, flops, plan.grad_slots, frozenset(plan.cache_blocks),
        n_offloaded=plan.n_offloaded, act_block_bytes=plan.micro_batches * plan.act_bytes, recomputed_inputs=frozenset(plan.recomputed_inputs),
        n_on_ssd=plan.n_on_ssd, train_states=plan.opt_slots > 0, ranks=ranks, keeps_grads=keeps_grads, kept_forward=not plan.recompute,
        weights_codec=codec,
    )
