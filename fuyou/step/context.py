"""What the task bodies of a step work on: the run's parts (`RunContext`, built once by the runtime)
and the state one step's tasks share (`StepState`, built per step)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional

import torch

from ..config import OptimConfig
from ..data.dataset import Batch
from ..dist.group import RankGroup
from ..model.skeleton import Skeleton
from ..store.store import Store
from .activations import Activations
from .cache import BlockCache
from .spec import Consumer
from .memory_plan import MemoryPlan
from .slots import Slots


class LinkBytes:
    """Bytes the step's task bodies moved, per link, counted where they move them (the store counts
    its block files itself): scratch files of offloaded block inputs ("ssd read" / "ssd written"),
    host -> device and device -> host copies. graph.bytes_per_step names the same links."""

    def __init__(self):
        self._lock = threading.Lock()
        self.total: Dict[str, int] = {}

    def add(self, link: str, nbytes: int) -> None:
        with self._lock:
            self.total[link] = self.total.get(link, 0) + int(nbytes)

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self.total)


@dataclass
class RunContext:
    store: Store
    skeleton: Skeleton
    cons: List[Consumer]  # the compute lane's consumers of weights, in order
    plan: MemoryPlan
    slots: Slots
    cache: BlockCache
    acts: Activations
    device: torch.device
    streams: Dict[str, torch.cuda.Stream]  # "h2d", "d2h" side streams on CUDA; empty otherwise
    optim: OptimConfig
    max_grad_norm: Optional[float]
    disk_mode: str  # "safe" | "lean"
    # parameter -> whether it got a gradient in this run's first step: torch.optim.AdamW skips a
    # parameter without one, and counts its steps apart once that changes (bodies.optim refuses then)
    had_grad: Dict[str, bool] = field(default_factory=dict)
    frozen: bool = False  # the base is not trained (LoRA): its weights get no gradient
    group: Optional[RankGroup] = None  # the ranks of a data-parallel run (None: one process)
    owners: Dict[str, int] = field(default_factory=dict)  # ranks: block -> the rank that updates it (fuyou.dist.partition)
    moved: LinkBytes = field(default_factory=LinkBytes)  # what the bodies moved besides the store's block files

    def owns(self, block: str) -> bool:
        """Whether this process updates the block (its store holds the block's master and moments)."""
        return "master" in self.store.layouts[block].kinds

    def grad_blocks(self, c: Consumer) -> List[str]:
        """Blocks whose gradient slot consumer c writes into (none in the forward)."""
        if c.phase == "fwd":
            return []
        return [b for b in c.weight_blocks if self.store.layouts[b].numel > 0]


@dataclass
class StepState:
    step: int
    lr: float
    mbs: List[Batch]  # the micro-batches, on the compute device
    targets: int  # label tokens of the whole batch (the loss is their mean)
    kwargs: Dict[int, dict] = field(default_factory=dict)  # micro-batch -> the layers' keyword inputs (masks, positions)
    out_grads: Dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> gradient of the current block's output
    graphs: Dict[tuple, tuple] = field(default_factory=dict)  # kept forward: (block, micro-batch) -> (input, output)
    refs: Dict[int, object] = field(default_factory=dict)  # kept forward: block -> its saved-weight hooks
    fwd_params: Dict[int, dict] = field(default_factory=dict)  # kept forward: block -> the Parameters its graph uses
    loss_sums: List[float] = field(default_factory=list)
    grad_started: set = field(default_factory=set)  # blocks whose gradient region this step has zeroed
    grad_scale: float = 1.0  # clip factor of a redone optimizer pass
    done_blocks: FrozenSet[str] = frozenset()  # lean mode: blocks already updated by a crashed run
    evaluating: bool = False  # a forward-only pass (validation): no gradients, inputs freed once read
    norms: Dict[str, torch.Tensor] = field(default_factory=dict)  # per-parameter fp32 gradient norms
    received: set = field(default_factory=set)  # parameters autograd gave a gradient this step (the others are not updated)
    tied_rows: Optional[torch.Tensor] = None  # embedding rows the step's tokens touch (tied.py)
    tied_head: Dict[tuple, torch.Tensor] = field(default_factory=dict)  # (param, micro-batch) -> the head's gradient at those rows
    side_grads: Dict[int, dict] = field(default_factory=dict)  # micro-batch -> gradients of layer inputs besides the hidden state (sides.py)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_norms(self, norms: Dict[str, torch.Tensor]) -> None:
        with self._lock:  # the optimizer lane and a redo both report here
            self.norms.update(norms)

    def total_norm(self, order: List[str]) -> float:
        """Global L2 norm, reduced like torch.nn.utils.clip_grad_norm_ (fp32, parameter order)."""
        norms = [self.norms[n] for n in order if n in self.norms]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def clear_kept_forward(self) -> None:
        self.graphs.clear()
        self.refs.clear()
        self.fwd_params.clear()
