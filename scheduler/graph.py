"""A task graph: tasks with dependencies, the lane (resource) each occupies, and its size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

# Task kinds, as the trace and the cost model know them ("collective": a communication every rank of a
# data-parallel run takes part in).
KINDS = ("read", "h2d", "compute", "d2h", "optim", "write", "commit", "delete", "collective")


@dataclass(eq=False)
class Task:
    """One unit of work. `fn()` runs on a thread of `lane` once every task in `deps` has finished."""

    name: str
    kind: str
    lane: str
    fn: Callable[[], object]
    deps: List["Task"] = field(default_factory=list)
    nbytes: int = 0  # bytes moved (I/O and copies)
    flops: int = 0  # floating-point operations (compute, optimizer)
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.kind}, lane={self.lane})"


class Graph:
    """An ordered list of tasks; `add` returns the task so later tasks can depend on it."""

    def __init__(self) -> None:
        self.tasks: List[Task] = []
        self._names: Dict[str, Task] = {}

    def add(
        self,
        name: str,
        kind: str,
        lane: str,
        fn: Callable[[], object],
        deps: Optional[List[Optional[Task]]] = None,
        *,
        nbytes: int = 0,
        flops: int = 0,
        **meta,
    ) -> Task:
        if name in self._names:
            raise ValueError(f"duplicate task name {name!r}")
        task = Task(name, kind, lane, fn, [d for d in (deps or []) if d is not None], nbytes, flops, dict(meta))
        for d in task.deps:
            if d.name not in self._names:
                raise ValueError(f"task {name!r} depends on {d.name!r}, which is not in this graph (add it first)")
        self.tasks.append(task)
        self._names[name] = task
        return task

    def __getitem__(self, name: str) -> Task:
        return self._names[name]

    def get(self, name: str) -> Optional[Task]:
        return self._names.get(name)

    def __len__(self) -> int:
        return len(self.tasks)

    def lanes(self) -> List[str]:
        seen: Dict[str, None] = {}
        for t in self.tasks:
            seen.setdefault(t.lane, None)
        return list(seen)
