"""Task graphs, their executor, traces, the cost model that simulates them, and the planner.

Knows nothing of models or torch modules: fuyou builds a graph of `Task`s, each of a kind (read,
h2d, compute, d2h, optim, write, commit, collective), with the resource lane it occupies, its dependencies and
its size (bytes or FLOPs). The executor runs a graph on per-lane threads and records when each task
started and ended (`Trace`); `costmodel` simulates the same graph on measured `Rates`, and
`planner.choose` picks the fastest candidate graph that fits the memory budgets.
"""
from .executor import Executor, TaskFailed
from .graph import Graph, Task
from .trace import Trace, TraceEvent

__all__ = ["Executor", "Graph", "Task", "TaskFailed", "Trace", "TraceEvent"]
