"""The schedule of one step in words: one line per consumer of the compute lane, saying what it waits
for and what the other lanes may do while it computes (read ahead, copy to the device, offload
block inputs, run the optimizer, write states), in the style of a FlexGen loop.

It is read off the step graph itself, the one the runtime runs and the cost model simulates: a task
is listed beside the first consumer that can compute while it runs, the one after the last compute
task it depends on (directly or through other tasks); what a consumer must wait for is listed as
such instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Set

from scheduler import Graph, Task

from .graph import build_step_graph
from .spec import StepSpec

_WORDS = {
    "read_weights": "read w[{n}] {block}",
    "h2d": "h2d w[{n}]",
    "act_out": "offload in[{n}]",
    "act_in": "bring back in[{n}]",
    "read_states": "read states {block}",
    "optim": "optim {block}",
    "write": "write {block}",
    "reduce": "reduce grad {block}",
    "broadcast": "broadcast w {block}",
}
_NUMBER = re.compile(r"^[a-z_]+?(\d+):")  # the consumer (w[u]) or layer (in[i]) number of a task name


def _label(t: Task) -> str:
    number = _NUMBER.match(t.name)
    words = _WORDS.get(t.meta.get("role", ""), t.name)
    if t.kind == "read" and t.nbytes == 0 and t.meta.get("copy_bytes"):
        words = words.replace("read ", "copy ", 1) + " (cache)"  # the block cache serves it: a memory copy
    return words.format(n=number.group(1) if number else "", block=t.meta.get("block", ""))


def _wait_label(t: Task) -> str:
    """A dependency of a consumer: its weights, a block input, or its gradient slot being free."""
    if t.meta.get("role") == "optim":
        return f"grad slot (optim {t.meta.get('block', '')})"
    return _label(t)


def _earliest_consumer(g: Graph) -> Dict[str, int]:
    """Task name -> index of the first consumer that can compute while the task runs."""
    order = {t.name: k for k, t in enumerate(t for t in g.tasks if t.kind == "compute")}
    last: Dict[str, int] = {}  # the latest compute task each task waits for (-1: none)
    for t in g.tasks:  # in the order added: every dependency comes first
        last[t.name] = order[t.name] if t.kind == "compute" else max((last[d.name] for d in t.deps), default=-1)
    return {name: k + 1 for name, k in last.items() if name not in order}


def _waited_for(c: Task) -> Set[str]:
    """Names of the non-compute tasks compute task `c` waits for, directly or through others."""
    seen: Set[str] = set()
    todo = [d for d in c.deps if d.kind != "compute"]
    while todo:
        t = todo.pop()
        if t.name not in seen:
            seen.add(t.name)
            todo += [d for d in t.deps if d.kind != "compute"]
    return seen


@dataclass
class Row:
    index: str  # the consumer's position in the compute order ("" for the lines before and after)
    compute: str  # its compute task, or what the line stands for
    waits: List[Task]  # the tasks it waits for, besides the consumer before it
    during: List[Task]  # what the other lanes may run while it computes


def schedule_rows(spec: StepSpec) -> List[Row]:
    """The rows describe() prints, from the step graph of `spec`."""
    g = build_step_graph(spec)
    compute = [t for t in g.tasks if t.kind == "compute"]
    earliest = _earliest_consumer(g)
    during: Dict[int, List[Task]] = {}
    for t in g.tasks:
        if t.kind != "compute":
            during.setdefault(earliest[t.name], []).append(t)
    before_first = _waited_for(compute[0])
    rows = [Row("", "(before the first)", [], [t for t in during.get(0, []) if t.name in before_first])]
    for k, c in enumerate(compute):
        waited = _waited_for(c)
        direct = [d for d in c.deps if d.kind != "compute"]
        # What it waits for through another task (a gradient slot freed by an optimizer that waits
        # for a collective) is a wait too: it runs between the consumer before and this one.
        through = [t for t in during.get(k, []) if t.name in waited and t not in direct and t.name not in before_first]
        rows.append(Row(str(k), c.name, direct + through, [t for t in during.get(k, []) if t.name not in waited | before_first]))
    rows.append(Row("", "(after the last)", [], during.get(len(compute), [])))
    return rows


def describe(spec: StepSpec) -> str:
    """The step's schedule, one line per consumer (see the module docstring)."""
    n_layers = sum(1 for c in spec.cons if c.phase == "fwd") - 1
    edge = [b for b, slot in spec.opt_owner.items() if slot < 0]  # in backward order
    lines = [
        f"one step: {n_layers} layers; slots: {spec.weight_slots} weight staging, {spec.device_slots} device, {spec.opt_slots} optimizer, "
        f"{spec.grad_slots} gradient" + (f", an edge slot ({' then '.join(edge)})" if edge else "") + f"; {spec.n_offloaded} layers' inputs offloaded ({spec.n_on_ssd} of them to the SSD), "
        f"{len(spec.recomputed_inputs)} recomputed; {len(spec.cached)} blocks cached" + (f"; {spec.ranks} ranks" if spec.ranks > 1 else ""),
        f"{'#':>3}  {'compute':<18} {'waits for':<44} while it runs",
    ]
    for row in schedule_rows(spec):
        waits = ", ".join(_wait_label(t) for t in row.waits) or "-"
        lines.append(f"{row.index:>3}  {row.compute:<18} {waits:<44} {', '.join(_label(t) for t in row.during) or '-'}")
    lines.append(f"{'':>3}  {'then':<18} {'every write':<44} commit (the manifest switches to the new step)")
    return "\n".join(lines)
