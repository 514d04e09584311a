"""The fixed buffers a run reuses every step, allocated once from its memory plan, and views into them.

    weight staging slots (host)   consumer's weights as stored, slot consumer % W (W = prefetch depth + 1)
    device weight slots           the same decoded to the compute dtype, slot consumer % D (none when the
                                  device is the host and the stored dtype is the compute dtype)
    optimizer slots (host)        a block's master, moments and new weights (regions at the offsets
                                  of slot_sizes.opt_region_offsets), cycled in backward order
    gradient slots (host)         a block's fp32 gradient, cycled in the same order
    edge slot (host)              an optimizer and a gradient slot of their own for the memory plan's
                                  edge blocks (a tied embedding, or the untied head then embedding)
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..memory import Pool
from ..optim.state import decode_weights
from ..store.directio import aligned_bytes
from ..store.store import Store
from .spec import Consumer, assign_opt_slots
from .memory_plan import MemoryPlan
from .slot_sizes import SLOT_KINDS, opt_region_offsets


class Slots:
    def __init__(self, plan: MemoryPlan, store: Store, cons: List[Consumer], *, cpu_pool: Pool, dev_pool: Pool,
                 compute_dtype: torch.dtype):
        self.store, self.cons, self.compute_dtype = store, cons, compute_dtype
        self.staging = [cpu_pool.alloc(plan.stage_slot_bytes) for _ in range(plan.weight_slots)]
        self.device = [dev_pool.alloc(plan.device_slot_bytes) for _ in range(plan.device_slots)]
        self.optimizer = [cpu_pool.alloc(plan.opt_slot_bytes) for _ in range(plan.opt_slots)]
        self.grads = [cpu_pool.alloc(plan.grad_slot_bytes) for _ in range(plan.grad_slots)]
        self.edge_optimizer: Optional[torch.Tensor] = cpu_pool.alloc(plan.edge_opt_bytes) if plan.edge_blocks else None
        self.edge_grads: Optional[torch.Tensor] = cpu_pool.alloc(plan.edge_grad_bytes) if plan.edge_blocks else None
        # A frozen base (no optimizer slots) trains nothing of its own: no block owns a slot.
        self.opt_owner = assign_opt_slots(cons, plan.edge_blocks, len(self.optimizer)) if self.optimizer else {}
        self.grad_owner = assign_opt_slots(cons, plan.edge_blocks, len(self.grads)) if self.grads else {}

    # -- optimizer and gradient slots --------------------------------------------------------
    def optimizer_slot(self, block: str) -> torch.Tensor:
        idx = self.opt_owner[block]
        return self.edge_optimizer if idx < 0 else self.optimizer[idx]

    def optimizer_region(self, block: str, kind: str) -> torch.Tensor:
        """The bytes of (block, kind) inside the block's optimizer slot, as long as its file."""
        off = opt_region_offsets(self.store, block)[kind]
        return self.optimizer_slot(block)[off : off + self.store.layouts[block].kinds[kind].file_bytes]

    def optimizer_views(self, block: str) -> Dict[str, Dict[str, Dict[str, torch.Tensor]]]:
        """{kind: {param: {part: flat view}}} of master, moments and new weights in the block's slot."""
        lay = self.store.layouts[block]
        return {k: lay.kinds[k].views(self.optimizer_region(block, k)) for k in SLOT_KINDS}

    def slot_bytes(self, block: str) -> torch.Tensor:
        """Every region of the block's optimizer slot (what the block cache keeps)."""
        return self.optimizer_slot(block)[: opt_region_offsets(self.store, block)["end"]]

    def grad(self, block: str) -> torch.Tensor:
        """The block's flat fp32 gradient in its gradient slot."""
        idx = self.grad_owner[block]
        slot = self.edge_grads if idx < 0 else self.grads[idx]
        return slot[: self.store.layouts[block].numel * 4].view(torch.float32)

    def grad_views(self, block: str) -> Dict[str, torch.Tensor]:
        """{param: flat fp32 view} of the block's gradient, in the store's parameter order."""
        grad, out, off = self.grad(block), {}, 0
        for name, numel in self.store.layouts[block].params:
            out[name] = grad[off : off + numel]
            off += numel
        return out

    # -- weight slots ---------------------------------------------------------------------------
    def staged_weights(self, consumer: int) -> Dict[str, torch.Tensor]:
        """The consumer's parameters decoded from its staging slot (views, or dequantized fp8)."""
        stage, off, out = self.staging[consumer % len(self.staging)], 0, {}
        for b in self.cons[consumer].weight_blocks:
            kl = self.store.layouts[b].kinds["weights"]
            for name, parts in kl.views(stage[off : off + kl.file_bytes]).items():
                out[name] = decode_weights(self.store.state.cfg, parts, self.store.layouts[b].shapes[name])
            off += kl.file_bytes
        return out

    def staging_regions(self, consumer: int) -> List[tuple]:
        """[(block, region)] of consumer's staging slot: where each weights file is read into."""
        stage, off, out = self.staging[consumer % len(self.staging)], 0, []
        for b in self.cons[consumer].weight_blocks:
            n = self.store.layouts[b].kinds["weights"].file_bytes
            out.append((b, stage[off : off + n]))
            off += n
        return out

    def device_weights(self, consumer: int) -> Dict[str, torch.Tensor]:
        """The consumer's parameters in its device slot (compute dtype), flat."""
        dslot, off, out = self.device[consumer % len(self.device)], 0, {}
        esize = torch.empty((), dtype=self.compute_dtype).element_size()
        for b in self.cons[consumer].weight_blocks:
            for name, numel in self.store.layouts[b].params:
                out[name] = dslot[off : off + numel * esize].view(self.compute_dtype)
                off += aligned_bytes(numel * esize, 256)
        return out

    def weights(self, consumer: int) -> Dict[str, torch.Tensor]:
        """What the compute of consumer runs on: device slot views, or the staging views."""
        return self.device_weights(consumer) if self.device else self.staged_weights(consumer)

    def compute_slot(self, consumer: int) -> torch.Tensor:
        """The buffer consumer's compute weights live in."""
        return self.device[consumer % len(self.device)] if self.device else self.staging[consumer % len(self.staging)]
