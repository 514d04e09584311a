"""What a host optimizer or gradient slot holds of a block, and how large each slot is in either
slot layout (the cycled slots alone, or beside the edge slot; see memory_plan.plan_memory)."""
from __future__ import annotations

from typing import List

from ..optim.state import OPTIM_KINDS
from ..store.directio import aligned_bytes
from ..store.layout import BlockLayout
from ..store.store import Store

# What an optimizer slot holds of a block, in this order: the states the optimizer updates and the
# compute weights it emits.
SLOT_KINDS = OPTIM_KINDS + ("weights",)


def weights_are_master(lay: BlockLayout) -> bool:
    """Whether a block's compute weights are its master byte for byte: fp32 weights of an fp32
    master have the same parts at the same offsets, and the update writes the one value to both.
    Their files stay two (the forward reads the weights', the optimizer the master's); in memory
    they are one region, written once by the update."""
    kinds = lay.kinds
    w, m = kinds.get("weights"), kinds.get("master")
    return w is not None and m is not None and w.parts == m.parts and w.file_bytes == m.file_bytes


def opt_region_offsets(store: Store, block: str) -> dict:
    """Byte offsets of master / exp_avg / exp_avg_sq / new weights inside an optimizer slot (the
    weights at the master's offset when they are the master: weights_are_master). The block's
    gradient has its own slot (grad slots), so the backward of the next block need not wait for
    this block's states to be written."""
    lay = store.layouts[block]
    off, out = 0, {}
    for kind in (k for k in SLOT_KINDS if k in lay.kinds):  # a frozen base's store holds only weights
        if kind == "weights" and weights_are_master(lay):
            out[kind] = out["master"]
            continue
        out[kind] = off
        off += lay.kinds[kind].file_bytes
    out["end"] = off
    return out


def slot_layout(store: Store, edge_blocks: tuple = ()) -> dict:
    """The sizes of the cycled optimizer and gradient slots, each for the largest block they hold,
    and of the edge slot, for the largest of `edge_blocks` (MemoryPlan's fields of that name)."""
    def opt(blocks) -> int:
        return max((opt_region_offsets(store, b)["end"] for b in blocks), default=0)

    def grad(blocks) -> int:
        return max((aligned_bytes(store.layouts[b].numel * 4) for b in blocks), default=0)

    cycled = [b for b in store.block_names if b not in edge_blocks]
    return dict(edge_blocks=tuple(edge_blocks), opt_slot_bytes=opt(cycled), grad_slot_bytes=grad(cycled), edge_opt_bytes=opt(edge_blocks),
                edge_grad_bytes=grad(edge_blocks))


def slot_layouts(store: Store, tied: bool, frozen: bool) -> List[dict]:
    """The slot layouts a plan may take, the default first. A frozen base has no optimizer or
    gradient slot. A tied embedding always has the edge slot (the head's backward writes into its
    gradient long before the embedding's backward does). An untied head and embedding may share it
    (head first, embedding last, the optimizer's first and last blocks): the cycled slots are then
    sized for the largest other block, and the embedding's state read waits for the head's write
    instead of the last layer's; plan_memory takes it when that keeps every kind of slot as many."""
    if frozen:
        return [dict(edge_blocks=(), opt_slot_bytes=0, grad_slot_bytes=0, edge_opt_bytes=0, edge_grad_bytes=0)]
    return [slot_layout(store, edge) for edge in edge_choices(store.block_names, tied)]


def edge_choices(block_names: List[str], tied: bool) -> List[tuple]:
    """The edge blocks of each slot layout a trained run may take (see slot_layouts), the default
    first; `block_names` in forward order, embedding first, head last."""
    embed, *layers, head = block_names
    return [(embed,)] if tied else [()] + ([(head, embed)] if layers else [])


def layout_bytes(layout: dict, opt_slots: int, grad_slots: int) -> int:
    """Host bytes of `opt_slots` optimizer and `grad_slots` gradient slots of a slot layout, and its
    edge slot."""
    return opt_slots * layout["opt_slot_bytes"] + grad_slots * layout["grad_slot_bytes"] + layout["edge_opt_bytes"] + layout["edge_grad_bytes"]


def least_slot_bytes(store: Store, tied: bool) -> int:
    """Host bytes of a trained run's fewest optimizer and gradient slots: one of each in the default
    layout (and a tied embedding's edge slot), what any host budget holds beside its weight slot."""
    return layout_bytes(slot_layouts(store, tied, False)[0], 1, 1)
