"""Per-task timing records and their export to the Chrome/Perfetto trace format."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class TraceEvent:
    name: str
    kind: str
    lane: str
    start_ns: int
    end_ns: int
    nbytes: int = 0
    flops: int = 0
    step: Optional[int] = None
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class Trace:
    """Thread-safe list of TraceEvents; times are time.perf_counter_ns() relative to `origin_ns`."""

    def __init__(self) -> None:
        self.origin_ns = time.perf_counter_ns()
        self.events: List[TraceEvent] = []
        self._lock = threading.Lock()

    def record(self, event: TraceEvent) -> None:
        with self._lock:
            self.events.append(event)

    def by_name(self) -> Dict[str, TraceEvent]:
        with self._lock:
            return {e.name: e for e in self.events}

    def lanes(self) -> List[str]:
        seen: Dict[str, None] = {}
        with self._lock:
            for e in self.events:
                seen.setdefault(e.lane, None)
        return list(seen)

    def to_chrome(self) -> dict:
        """Chrome trace JSON (open in Perfetto or chrome://tracing): one thread lane per resource."""
        lanes = self.lanes()
        tid = {lane: i + 1 for i, lane in enumerate(lanes)}
        events: List[dict] = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "fuyou"}}]
        for lane, i in tid.items():
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": lane}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": i, "args": {"sort_index": i}})
        with self._lock:
            for e in self.events:
                args = {"bytes": e.nbytes, "flops": e.flops}
                if e.step is not None:
                    args["step"] = e.step
                args.update({k: v for k, v in e.meta.items() if isinstance(v, (int, float, str, bool))})
                events.append(
                    {
                        "name": e.name,
                        "cat": e.kind,
                        "ph": "X",
                        "pid": 1,
                        "tid": tid[e.lane],
                        "ts": (e.start_ns - self.origin_ns) / 1e3,
                        "dur": max(e.end_ns - e.start_ns, 0) / 1e3,
                        "args": args,
                    }
                )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_chrome(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_chrome(), f)
