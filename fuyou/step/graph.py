"""The task graph of one training step, built from sizes alone.

Built from a StepSpec (spec.py). The runtime builds it with real task bodies (bodies.py) and runs it; the planner builds the very
same graph with no bodies and feeds it to the cost model (scheduler.costmodel) to predict a step
before running it; the profiler rebuilds it from a trace. Slot reuse is expressed as dependencies
(a task starts only once the task that last used its slot has finished), so what the cost model
simulates is exactly what the executor will be allowed to do, and no task ever waits for memory.
`describe()` (schedule.py) prints the schedule one line per consumer.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Iterable, List, Optional, Protocol

from scheduler import Graph

from .spec import BlockSizes, StepSpec, block_indices, compute_work


# One thread per lane: the executor and the cost model both run the step graph with these. `comm`:
# a data-parallel run's collectives, one at a time in graph order (every rank issues them alike).
LANES = {"read": 1, "write": 1, "h2d": 1, "d2h": 1, "compute": 1, "optim": 1, "commit": 1, "comm": 1}


def _previous_holders(order: List[str], owner: Dict[str, int], slots: int) -> Dict[str, str]:
    """block -> the block that used its slot before it, in `order`: the cycled slots' and the edge
    slot's (owner -1: the untied head, then the embedding)."""
    cyc = [b for b in order if owner[b] >= 0]
    edge = [b for b in order if owner[b] < 0]
    return {**{cyc[i]: cyc[i - slots] for i in range(slots, len(cyc))}, **dict(zip(edge[1:], edge))}


class TaskName:
    """The name of every task of the step graph, one constructor per role: the graph names its tasks
    with these and the profiler finds them in a trace with the same calls. Each task also carries
    its role in `meta["role"]`."""

    @staticmethod
    def read_weights(consumer: int, block: str) -> str:
        return f"read_w{consumer}:{block}"

    @staticmethod
    def h2d(consumer: int, block: str) -> str:
        return f"h2d{consumer}:{block}"

    @staticmethod
    def compute(phase: str, block: str) -> str:
        return f"{phase}:{block}"

    @staticmethod
    def act_out(i: int, block: str) -> str:
        return f"act_out{i}:{block}"

    @staticmethod
    def act_in(i: int, block: str) -> str:
        return f"act_in{i}:{block}"

    @staticmethod
    def read_states(block: str, redo: bool = False) -> str:
        return f"{'redo_' if redo else ''}read_s:{block}"

    @staticmethod
    def read_grad(block: str) -> str:
        return f"redo_read_g:{block}"

    @staticmethod
    def optim(block: str, redo: bool = False) -> str:
        return f"{'redo_' if redo else ''}optim:{block}"

    @staticmethod
    def write(block: str, redo: bool = False) -> str:
        return f"{'redo_' if redo else ''}write:{block}"

    @staticmethod
    def reduce(block: str) -> str:
        return f"reduce:{block}"

    @staticmethod
    def broadcast(block: str, redo: bool = False) -> str:
        return f"{'redo_' if redo else ''}bcast:{block}"


class TaskBodies(Protocol):
    """What each task runs (bodies.StepBodies); the graph binds the argument."""

    def read_weights(self, consumer: int) -> None: ...
    def h2d(self, consumer: int) -> None: ...
    def compute(self, consumer: int) -> None: ...
    def read_states(self, b: str) -> None: ...
    def optim(self, b: str) -> None: ...
    def write(self, b: str) -> None: ...
    def read_grad(self, b: str) -> None: ...
    def act_out(self, i: int) -> None: ...
    def act_in(self, i: int) -> None: ...
    def reduce_grad(self, b: str) -> None: ...
    def broadcast_weights(self, b: str) -> None: ...


class NoBodies:
    """Bodies that do nothing: the graph's shape and sizes only (for the cost model)."""

    def __getattr__(self, _name):
        return _noop


def _noop(*_args) -> None:
    return None


def _optimizer_order(spec: StepSpec) -> List[str]:
    """Blocks with parameters in the order the optimizer lane updates them (backward order)."""
    if not spec.train_states:
        return []
    return [c.block for c in spec.cons if c.phase != "fwd" and spec.blocks[c.block].numel]


class _StepGraphBuilder:
    """Adds the tasks of one step in compute order; each method adds one kind of task with the
    dependencies that order its slot reuse."""

    def __init__(self, spec: StepSpec, bodies: TaskBodies):
        self.spec, self.bodies, self.g = spec, bodies, Graph()
        order = _optimizer_order(spec)
        self.opt_free = _previous_holders(order, spec.opt_owner, spec.opt_slots)  # freed by that block's write
        self.grad_free = _previous_holders(order, spec.opt_owner, spec.grad_slots)  # freed by that block's optimizer
        self.index = block_indices(spec.cons)
        self.compute: list = []  # compute task of each consumer so far
        self.ready: dict = {}  # consumer -> the task after which its weights sit in their slot
        self.head_read = None  # the head's weights read: the forward's last
        self.optims: dict = {}
        self.writes: dict = {}
        self.act_out: dict = {}  # layer -> its offload task
        self.bwd_done: dict = {}  # layer -> its backward's compute task
        self.collectives = _Collectives(self.g, spec.ranks)
        self.unsent: Optional[str] = None  # ranks: the block whose new weights are broadcast after the next reduce

    def weights_ready(self, consumer: int):
        """The task after which the consumer's weights sit in its slot (added once)."""
        if consumer in self.ready:
            return self.ready[consumer]
        spec, g, c = self.spec, self.g, self.spec.cons[consumer]
        W, D = spec.weight_slots, spec.device_slots
        stage_bytes = sum(spec.blocks[b].weights_bytes for b in c.weight_blocks)
        copied = sum(spec.blocks[b].weights_bytes for b in c.weight_blocks if b in spec.cached)
        # The staging slot is free once its last user has been copied to the device (or computed).
        release = (self.ready[consumer - W] if D else self.compute[consumer - W]) if consumer >= W else None
        # nbytes: what the store reads; copy_bytes: what comes from the block cache instead.
        task = g.add(TaskName.read_weights(consumer, c.block), "read", "read", partial(self.bodies.read_weights, consumer), [release],
                     nbytes=stage_bytes - copied, block=c.block, copy_bytes=copied, role="read_weights")
        if c.phase == "head":
            self.head_read = task
        if D:
            dev_free = self.compute[consumer - D] if consumer >= D else None
            copied_bytes = sum(spec.blocks[b].copied_bytes for b in c.weight_blocks)  # decoded on the host, then copied
            task = g.add(TaskName.h2d(consumer, c.block), "h2d", "h2d", partial(self.bodies.h2d, consumer), [task, dev_free], nbytes=copied_bytes,
                         block=c.block, role="h2d", codec=spec.weights_codec)
        self.ready[consumer] = task
        return task

    def add_consumer(self, consumer: int) -> None:
        spec, c = self.spec, self.spec.cons[consumer]
        i = self.index.get(c.block, -1)
        deps = [self.weights_ready(consumer), self.compute[-1] if self.compute else None]
        recomputed = c.phase == "bwd" and i in spec.recomputed_inputs
        if recomputed:
            # Its input is recomputed from the layer below, whose weights (the next consumer's) must
            # be in their slot already (the plan keeps two slots then, so nothing waits on this compute).
            deps.append(self.weights_ready(consumer + 1))
        if c.phase != "fwd":  # its gradient slot is free once the optimizer of its last user has run
            deps += [self.optims[self.grad_free[b]] for b in c.weight_blocks if b in self.grad_free]
        if c.phase == "fwd" and i - 2 in self.act_out:
            deps.append(self.act_out[i - 2])  # at most three offloaded inputs on the device in the forward
        if c.phase == "bwd" and 1 <= i <= spec.n_offloaded:
            deps.append(self._bring_back(i, c.block))
        extra = {"from_below": True} if recomputed else {}  # kept in the trace for the profiler
        task = self.g.add(TaskName.compute(c.phase, c.block), "compute", "compute", partial(self.bodies.compute, consumer), deps, flops=spec.flops[consumer],
                          block=c.block, phase=c.phase, role="compute", work=compute_work(c.phase, i, spec.kept_forward), **extra)
        self.compute.append(task)
        if c.phase == "fwd" and 1 <= i <= spec.n_offloaded:
            lane = "write" if i <= spec.n_on_ssd else "d2h"
            self.act_out[i] = self.g.add(TaskName.act_out(i, c.block), lane, lane, partial(self.bodies.act_out, i), [task],
                                         nbytes=spec.act_block_bytes, block=c.block, role="act_out")
        if c.phase == "bwd":
            self.bwd_done[i] = task
        if c.phase != "fwd" and spec.blocks[c.block].numel and spec.train_states:
            self._optimize(c.block, task)

    def _bring_back(self, i: int, block: str):
        """Layer i's offloaded inputs, back just before its backward, once the backward two layers
        later has freed its own."""
        lane = "read" if i <= self.spec.n_on_ssd else "h2d"
        return self.g.add(TaskName.act_in(i, block), lane, lane, partial(self.bodies.act_in, i), [self.act_out[i], self.bwd_done.get(i + 2)],
                          nbytes=self.spec.act_block_bytes, block=block, role="act_in")

    def _optimize(self, b: str, backward) -> None:
        """Block b's state read (once its optimizer slot is free), AdamW after its backward, write.
        With ranks: b's gradient is reduced to its owner first, and its new weights are broadcast
        from the owner before the write, after the next block's reduce (the collectives alternate)."""
        g, size = self.g, self.spec.blocks[b]
        grad_ready = backward
        if self.spec.ranks > 1:
            grad_ready = self.collectives.add(TaskName.reduce(b), partial(self.bodies.reduce_grad, b), [backward], nbytes=4 * size.numel, block=b,
                                              role="reduce")
            self.send_weights()
        # The first block in a slot reads its states after the head's weights (the forward's last
        # weight read), not at the step's start, where it would hold up the forward's reads.
        prev = self.writes[self.opt_free[b]] if b in self.opt_free else self.head_read
        hit = b in self.spec.cached
        rs = g.add(TaskName.read_states(b), "read", "read", partial(self.bodies.read_states, b), [prev], nbytes=0 if hit else size.states_bytes,
                   block=b, copy_bytes=size.states_bytes if hit else 0, role="read_states")
        # A clipping run's first pass also writes b's gradient to the store (its owner's, on the optim lane).
        kept = 4 * size.numel if self.spec.keeps_grads and size.states_bytes else 0
        self.optims[b] = g.add(TaskName.optim(b), "optim", "optim", partial(self.bodies.optim, b), [grad_ready, rs], nbytes=_optim_bytes(size),
                               block=b, numel=size.numel, role="optim", write_bytes=kept)
        if self.spec.ranks > 1:
            self.unsent = b
        else:
            self.writes[b] = _write(g, self.bodies, b, size, [self.optims[b]])

    def send_weights(self) -> None:
        """The broadcast of the last optimized block's new weights, then its write."""
        b, self.unsent = self.unsent, None
        if b is not None:
            size = self.spec.blocks[b]
            sent = self.collectives.add(TaskName.broadcast(b), partial(self.bodies.broadcast_weights, b), [self.optims[b]],
                                        nbytes=size.weights_bytes, block=b, role="broadcast")
            self.writes[b] = _write(self.g, self.bodies, b, size, [self.optims[b], sent])


class _Collectives:
    """The comm lane's tasks, chained in the order they are added: every rank then issues the same
    collectives in the same order, whatever order their dependencies finish in."""

    def __init__(self, g: Graph, ranks: int):
        self.g, self.ranks, self.last = g, ranks, None

    def add(self, name: str, fn, deps: list, **meta):
        self.last = self.g.add(name, "collective", "comm", fn, deps + [self.last], ranks=self.ranks, **meta)
        return self.last


def _write(g: Graph, bodies, b: str, size: BlockSizes, deps: list, redo: bool = False):
    return g.add(TaskName.write(b, redo), "write", "write", partial(bodies.write, b), deps, nbytes=size.states_bytes + size.weights_bytes,
                 block=b, role="write")


def _optim_bytes(size: BlockSizes) -> int:
    """Host memory an optimizer pass touches: states read and written, new weights, the fp32 gradient."""
    return 2 * size.states_bytes + size.weights_bytes + 4 * size.numel


def build_step_graph(spec: StepSpec, bodies: Optional[TaskBodies] = None) -> Graph:
    if spec.recomputed_inputs and (spec.weight_slots < 2 or spec.device_slots == 1):
        raise ValueError("recomputed block inputs need two weight slots (and two device slots when there are any)")
    builder = _StepGraphBuilder(spec, bodies or NoBodies())
    for consumer in range(len(spec.cons)):
        builder.add_consumer(consumer)
    builder.send_weights()
    return builder.g


def build_eval_graph(spec: StepSpec, bodies: Optional[TaskBodies] = None) -> Graph:
    """A forward-only pass (validation): the forward consumers and the head's loss, each block's
    weights read once into the step's own slots; no gradient, optimizer or state I/O."""
    builder = _StepGraphBuilder(spec, bodies or NoBodies())
    head = next(k for k, c in enumerate(spec.cons) if c.phase == "head")
    for consumer in range(head + 1):
        block = spec.cons[consumer].block
        deps = [builder.weights_ready(consumer), builder.compute[-1] if builder.compute else None]
        builder.compute.append(builder.g.add(TaskName.compute("eval", block), "compute", "compute", partial(builder.bodies.compute, consumer), deps,
                                             flops=spec.flops[consumer] // (3 if consumer == head else 1), block=block, phase="eval", role="compute",
                                             work=compute_work("eval", -1 if consumer == head else builder.index[block], False)))
    return builder.g


def build_redo_graph(spec: StepSpec, bodies: Optional[TaskBodies] = None) -> Graph:
    """The optimizer pass again, from the live (old) states and the kept gradients (a clipped step)."""
    bodies = bodies or NoBodies()
    g = Graph()
    order = _optimizer_order(spec)
    opt_free = _previous_holders(order, spec.opt_owner, spec.opt_slots)
    grad_free = _previous_holders(order, spec.opt_owner, spec.grad_slots)
    writes, optims, collectives = {}, {}, _Collectives(g, spec.ranks)
    for b in order:
        size = spec.blocks[b]
        rs = g.add(TaskName.read_states(b, redo=True), "read", "read", partial(bodies.read_states, b), [writes.get(opt_free.get(b))],
                   nbytes=size.states_bytes, block=b, role="read_states")
        # A block another rank owns: its owner kept the reduced gradient, this rank has none to read.
        grad_bytes = 4 * size.numel if size.states_bytes else 0
        rg = g.add(TaskName.read_grad(b), "read", "read", partial(bodies.read_grad, b), [optims.get(grad_free.get(b))], nbytes=grad_bytes,
                   block=b, role="read_grad")
        optims[b] = g.add(TaskName.optim(b, redo=True), "optim", "optim", partial(bodies.optim, b), [rs, rg], nbytes=_optim_bytes(size), block=b,
                          numel=size.numel, role="optim")
        deps = [optims[b]]
        if spec.ranks > 1:
            deps.append(collectives.add(TaskName.broadcast(b, redo=True), partial(bodies.broadcast_weights, b), [optims[b]],
                                        nbytes=size.weights_bytes, block=b, role="broadcast"))
        writes[b] = _write(g, bodies, b, size, deps, redo=True)
    return g


STORE_LANES = {"read": "ssd read", "write": "ssd written", "h2d": "cpu->gpu", "d2h": "gpu->cpu", "collective": "between ranks"}


def bytes_per_step(tasks: Iterable) -> Dict[str, int]:
    """Bytes one step moves per tier link (the store's reads and writes, host <-> device copies),
    and the block cache's memory copies under "block cache read": of a step graph's tasks (what
    the planner predicts) or of a traced step's events (what the profiler measured), alike."""
    out = {k: 0 for k in list(STORE_LANES.values()) + ["block cache read"]}
    for t in tasks:
        if t.kind in STORE_LANES:
            out[STORE_LANES[t.kind]] += t.nbytes
        out["block cache read"] += int(t.meta.get("copy_bytes", 0))
        out["ssd written"] += int(t.meta.get("write_bytes", 0))  # a kept gradient, written by the optimizer task
    return out
