"""The runtime: wires the parts of a run together once, then trains one optimizer step per `step()`.

A step is a task graph (graph.py; `describe()` prints its schedule) run by the scheduler's
executor, one thread per lane:
    read    weights of each consumer into its staging slot, ahead by the prefetch depth
    h2d     staging slot -> device slot (only when the device is not the host or dtypes differ)
    compute the consumers in order: fwd embed, fwd layers, head (forward + loss + backward), bwd
            layers, bwd embed; every micro-batch passes a block before the next block
    read    master and moments of block b into an optimizer slot, as soon as the slot is free
    optim   AdamW on block b right after its backward (overlapping the next block's backward)
    write   b's new master, moments and weights as new version files
then, after the graph, the global gradient norm decides: commit, clip (redo the optimizer pass from
the old states), or skip; `store.commit` switches the manifest atomically.
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Dict, Optional

import torch

from scheduler import Executor, Trace

from ..config import BatchConfig, MemoryConfig, OptimConfig
from ..data.dataset import Batch
from ..dist.commit import commit_step
from ..dist.group import RankGroup
from ..memory import Pool
from ..model.skeleton import Skeleton, count_targets
from ..optim.schedule import lr_schedule
from ..store.store import Store
from .activations import Activations
from .bodies import StepBodies
from .cache import BlockCache
from .context import LinkBytes, RunContext, StepState
from .graph import LANES, build_eval_graph, build_redo_graph, build_step_graph
from .spec import model_consumers, step_spec
from .memory_plan import MemoryPlan, compute_dtype_for, plan_for_model
from .slot_sizes import SLOT_KINDS
from .slots import Slots


@dataclasses.dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    grad_norm: float
    lr: float
    bytes_read: int
    bytes_written: int
    seconds: float
    bytes_copied: int = 0  # host memory copies of state (block cache reads and keeps); store I/O is bytes_read/written
    bytes_between_ranks: int = 0  # what this rank's collectives moved (reduced gradients, broadcast weights)
    bytes_h2d: int = 0  # host -> device copies (weights into device slots, offloaded block inputs back)
    bytes_d2h: int = 0  # device -> host copies (offloaded block inputs)
    events: list = dataclasses.field(default_factory=list)
    status: str = "ok"  # "ok", "clipped" (optimizer redone with the clip factor) or "skipped" (non-finite)


class Runtime:
    """Owns the pools, slots, cache and executor of a run. `plan`: the run's memory plan when the
    caller has made it already (it is made once per run); else it is made here from `memory`."""

    def __init__(self, store: Store, skeleton: Skeleton, *, device: torch.device, batch: BatchConfig, optim: OptimConfig,
                 memory: Optional[MemoryConfig] = None, plan: Optional[MemoryPlan] = None, trace: Optional[Trace] = None,
                 max_grad_norm: Optional[float] = None, disk_mode: str = "safe", total_steps: Optional[int] = None, frozen: bool = False,
                 group: Optional[RankGroup] = None, owners: Optional[Dict[str, int]] = None):
        _check_settings(max_grad_norm, disk_mode)
        if group is not None and (disk_mode != "safe" or frozen):
            raise ValueError("a data-parallel run needs --disk-mode safe and full fine-tuning (lean mode and --peft run on one process)")
        device = torch.device(device)
        self.store, self.batch_cfg, self.optim_cfg = store, batch, optim
        self.lr_at = lr_schedule(optim, total_steps)  # total_steps: the run's target (schedules that decay need it)
        self.compute_dtype = compute_dtype_for(device, store.layouts[store.block_names[0]].kinds["weights"].parts[0].dtype)
        self.cons = model_consumers(store, skeleton, frozen=frozen)
        if plan is None:
            plan = plan_for_model(store, skeleton, device=device, batch=batch, memory=memory or MemoryConfig(), compute_dtype=self.compute_dtype,
                                  frozen=frozen)
        self.plan = plan
        self.cpu_pool = Pool("cpu", plan.cpu_budget_bytes, torch.device("cpu"), pin=device.type == "cuda")
        self.dev_pool = Pool("gpu" if device.type == "cuda" else "device", plan.device_budget_bytes, device)
        self.dev_pool.reserve(plan.workspace_bytes + plan.kept_bytes, "compute workspace and kept activations")
        self.slots = Slots(plan, store, self.cons, cpu_pool=self.cpu_pool, dev_pool=self.dev_pool, compute_dtype=self.compute_dtype)
        self.cache = BlockCache(store, plan.cache_blocks, plan.cache_bytes)
        streams = {"h2d": torch.cuda.Stream(device), "d2h": torch.cuda.Stream(device)} if device.type == "cuda" else {}
        moved = LinkBytes()
        acts = Activations(store, plan, dev_pool=self.dev_pool, cpu_pool=self.cpu_pool, streams=streams, device=device, count=moved.add)
        skeleton.load_stored_buffers(store.model_dir())  # the checkpoint's buffers, as imported
        skeleton.move_buffers(device)
        self.ctx = RunContext(store, skeleton, self.cons, plan, self.slots, self.cache, acts, device, streams, optim, max_grad_norm, disk_mode,
                              frozen=frozen, group=group, owners=dict(owners or {}), moved=moved)
        self.trace = trace if trace is not None else Trace()
        self.executor = Executor(LANES, self.trace)
        self._eval_executor = Executor(LANES, Trace())  # validation passes stay out of the steps' trace
        self.spec = step_spec(store, self.cons, plan, self.slots.opt_owner, skeleton, batch, ranks=group.size if group is not None else 1,
                              keeps_grads=max_grad_norm is not None)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def cache_pool(self) -> Pool:
        return self.cache.pool

    def close(self) -> None:
        self.executor.shutdown()
        self._eval_executor.shutdown()
        self.store.settle()  # the last commit's superseded files, deleted by the time the run ends

    def step(self, batch: Batch, train_meta: Optional[dict] = None, targets: Optional[int] = None) -> StepResult:
        """Train one optimizer step on `batch`; commit it (or skip it) in the store. Ranks: `batch` is
        this rank's rows and `targets` the label tokens of every rank's (the loss is their mean)."""
        t0, store, group = time.perf_counter(), self.store, self.ctx.group
        step = store.step + 1
        read0, written0, n_events = store.bytes_read, store.bytes_written, len(self.trace.events)
        copied0, moved0 = self.ctx.cache.bytes_copied, self.ctx.moved.snapshot()
        try:
            st = self.forward_backward(batch, step, targets)
            norm = self._global_norm(st)
            status = self._finish(st, norm)
        except BaseException:
            store.discard(step)  # nothing of this step is live; its files are garbage now
            raise
        self._commit(st, status, train_meta if train_meta is not None else store.manifest.get("train"))
        loss_sum = sum(st.loss_sums) if group is None else group.sum(sum(st.loss_sums))
        moved = {k: v - moved0.get(k, 0) for k, v in self.ctx.moved.snapshot().items()}  # besides the store's block files
        return StepResult(
            step=step if status != "skipped" else step - 1, loss=loss_sum / max(st.targets, 1), tokens=int(batch.input_ids.numel()),
            grad_norm=norm, lr=st.lr, bytes_read=store.bytes_read - read0 + moved.get("ssd read", 0),
            bytes_written=store.bytes_written - written0 + moved.get("ssd written", 0), seconds=time.perf_counter() - t0,
            events=self.trace.events[n_events:], status=status, bytes_copied=self.ctx.cache.bytes_copied - copied0,
            bytes_between_ranks=moved.get("between ranks", 0), bytes_h2d=moved.get("cpu->gpu", 0), bytes_d2h=moved.get("gpu->cpu", 0),
        )

    def forward_backward(self, batch: Batch, step: int, targets: Optional[int] = None) -> StepState:
        """The step graph of optimizer step `step` on `batch` (with the optimizer tasks unless the base
        is frozen); its shared state (losses, norms) returned."""
        mbs = batch.split(self.batch_cfg.micro_batches)
        if self.device.type != "cpu":
            mbs = [m.to(self.device) for m in mbs]
        st = StepState(step, self.lr_at(step), mbs, count_targets(batch.labels) if targets is None else targets)
        st.done_blocks = frozenset(b for b, j in self.store.journal.items() if j["step"] == step)
        try:
            self.executor.run(build_step_graph(self.spec, StepBodies(self.ctx, st)), step=step)
        finally:
            self.ctx.acts.clear()
            st.clear_kept_forward()
        return st

    def evaluate(self, batch: Batch) -> tuple:
        """(loss summed over the batch's label tokens, their count): a forward-only pass of the
        committed weights, micro-batch by micro-batch as in a step; nothing is written."""
        size = self.batch_cfg.micro_batch_size
        mbs = [Batch(batch.input_ids[i:i + size], batch.labels[i:i + size], None if batch.attention_mask is None else batch.attention_mask[i:i + size])
               for i in range(0, batch.input_ids.shape[0], size)]
        if self.device.type != "cpu":
            mbs = [m.to(self.device) for m in mbs]
        st = StepState(self.store.step, 0.0, mbs, count_targets(batch.labels), evaluating=True)
        try:
            self._eval_executor.run(build_eval_graph(self.spec, StepBodies(self.ctx, st)), step=self.store.step)
        finally:
            self.ctx.acts.clear()
        return sum(st.loss_sums), st.targets

    def _global_norm(self, st: StepState) -> float:
        """The global gradient norm as clip_grad_norm_ computes it. Ranks: each parameter's norm is
        known to the rank that updates it; summed with the others' zeros it is exact on every rank."""
        order = list(self.ctx.skeleton.params)
        if self.ctx.group is None:
            return st.total_norm(order)
        norms = torch.zeros(len(order), dtype=torch.float32)
        for i, name in enumerate(order):
            if name in st.norms:
                norms[i] = st.norms[name]
        self.ctx.group.all_reduce_(norms)
        got = [norms[i] for i, name in enumerate(order) if name in st.received]
        return float(torch.linalg.vector_norm(torch.stack(got))) if got else 0.0

    def _finish(self, st: StepState, norm: float) -> str:
        """Decide the step once the global gradient norm is known: commit, clip (redo), or skip.

        The optimizer already ran on every block with the unclipped gradient, writing new versions;
        the live (old) versions are untouched until the commit. A non-finite gradient skips the
        step. Clipping redoes the optimizer from the old states and the kept gradients with
        torch.nn.utils.clip_grad_norm_'s factor max_norm / (norm + 1e-6).
        """
        max_norm = self.ctx.max_grad_norm
        if not math.isfinite(norm):
            return "skipped"
        if max_norm is None:
            return "ok"
        # In fp32, as clip_grad_norm_ computes it, so the clipped step matches PyTorch's.
        coef = float(torch.clamp(max_norm / (torch.tensor(norm, dtype=torch.float32) + 1e-6), max=1.0))
        if coef >= 1.0:
            return "ok"
        st.grad_scale = coef
        self.executor.run(build_redo_graph(self.spec, StepBodies(self.ctx, st)), step=st.step)
        return "clipped"

    def _commit(self, st: StepState, status: str, train_meta: Optional[dict]) -> None:
        store, step, group = self.store, st.step, self.ctx.group
        commit = store.commit if group is None else partial(commit_step, store, group)  # ranks: all commit, or none
        if status == "skipped":
            store.discard(step)
            commit(step - 1, {}, train_meta)  # advance past the batch, no state change
            return
        versions = {b: {k: step for k in SLOT_KINDS if k in store.layouts[b].kinds} for b in store.block_names if store.layouts[b].numel > 0}
        commit(step, versions, train_meta)
        store.discard(step, kinds=("grad",))


def _check_settings(max_grad_norm: Optional[float], disk_mode: str) -> None:
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"--max-grad-norm must be > 0, got {max_grad_norm}")
    if disk_mode not in ("safe", "lean"):
        raise ValueError(f"disk mode {disk_mode!r} unknown; choose safe or lean")
    if disk_mode == "lean" and max_grad_norm is not None:
        raise ValueError("--max-grad-norm needs --disk-mode safe: lean mode replaces each block's states before the global norm is known")
