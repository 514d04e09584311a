"""Task graphs, their executor, traces, and (later) the cost model and planner.

Knows nothing of models or torch modules: fuyou builds a graph of tasks (`Read`, `H2D`, `Compute`,
`D2H`, `OptimStep`, `Write`, `Commit`), each with the resource lane it occupies, its dependencies and
its size; the executor runs them on per-lane threads and records when each started and ended.
"""
from .executor import Executor, TaskFailed
from .graph import Graph, Task
from .trace import Trace, TraceEvent

__all__ = ["Executor", "Graph", "Task", "TaskFailed", "Trace", "TraceEvent"]
