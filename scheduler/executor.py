"""Runs a task graph: each lane is a small thread pool; a task starts when its deps have finished.

Lanes are resources (e.g. "read", "write", "h2d", "compute", "d2h", "optim"): tasks of one lane run
in the order they become ready, tasks of different lanes overlap. Every task's start and end is
recorded in the Trace, which is what the overlap tests and the profiler read.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Optional

from .graph import Graph, Task
from .trace import Trace, TraceEvent


class TaskFailed(RuntimeError):
    """A dependency failed, so this task never ran (the root cause is raised by `run`)."""


class Executor:
    """`Executor({"read": 1, "compute": 1, ...}).run(graph)`; lanes not named get one thread."""

    def __init__(self, lanes: Optional[Dict[str, int]] = None, trace: Optional[Trace] = None):
        self._threads = dict(lanes or {})
        self._pools: Dict[str, ThreadPoolExecutor] = {}
        self.trace = trace if trace is not None else Trace()
        self._lock = threading.Lock()

    def _pool(self, lane: str) -> ThreadPoolExecutor:
        with self._lock:
            if lane not in self._pools:
                n = self._threads.get(lane, 1)
                self._pools[lane] = ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"fuyou-{lane}")
            return self._pools[lane]

    def run(self, graph: Graph, step: Optional[int] = None) -> Dict[str, object]:
        """Run every task; return {name: result}. Raises the first task's own error (not TaskFailed)."""
        futures: Dict[str, Future] = {}
        for task in graph.tasks:
            futures[task.name] = self._submit(task, [futures[d.name] for d in task.deps], step)
        results: Dict[str, object] = {}
        root: Optional[BaseException] = None
        for name, fut in futures.items():  # wait for all, so nothing still runs when we return
            try:
                results[name] = fut.result()
            except TaskFailed:
                continue
            except BaseException as exc:  # noqa: BLE001
                root = root or exc
        if root is not None:
            raise root
        return results

    def _submit(self, task: Task, deps: list, step: Optional[int]) -> Future:
        out: Future = Future()
        remaining = [len(deps)]
        lock = threading.Lock()

        def start() -> None:
            failed = [d for d in deps if d.exception() is not None]
            if failed:
                out.set_exception(TaskFailed(f"{task.name}: a dependency failed"))
                return
            self._pool(task.lane).submit(self._run_task, task, out, step)

        def on_dep_done(_f: Future) -> None:
            with lock:
                remaining[0] -= 1
                ready = remaining[0] == 0
            if ready:
                start()

        if not deps:
            start()
        for d in deps:
            d.add_done_callback(on_dep_done)
        return out

    def _run_task(self, task: Task, out: Future, step: Optional[int]) -> None:
        t0 = time.perf_counter_ns()
        try:
            result = task.fn()
        except BaseException as exc:  # noqa: BLE001 - surfaced by run()
            out.set_exception(exc)
            return
        finally:
            t1 = time.perf_counter_ns()
            self.trace.record(TraceEvent(task.name, task.kind, task.lane, t0, t1, task.nbytes, task.flops, step, task.meta))
        out.set_result(result)

    def shutdown(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, {}
        for p in pools.values():
            p.shutdown(wait=True)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
