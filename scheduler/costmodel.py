"""Predict how long a task graph takes, by simulating the executor on modelled task durations.

The simulation is the executor's own policy (executor.py): every lane has a fixed number of threads;
a task becomes ready when its last dependency ends; each lane starts its ready tasks in the order
they became ready (ties: graph order), one per free thread. A task's duration comes from `Rates`:

    read / write / h2d / d2h   latency + nbytes / lane bandwidth
    collective                 latency + nbytes / collective bandwidth (what one rank sends)
    compute                    latency + calls * call overhead + flops / FLOP rate, or, for a kind of
                               work measured on the model's own blocks: calls * its cost per call
                               + flops / its rate
    optim                      latency + numel / params-per-second   (nbytes / bandwidth without numel),
                               + meta write_bytes / write bandwidth (a gradient it keeps on disk)
    commit, delete             latency + files deleted * per-file cost + their bytes * per-byte cost
                               (a step's commit switches the manifest; the files it supersedes are
                               deleted during the next step, on a lane of their own)

Lanes are independent here (no shared memory bandwidth or cores between them). Where they are not
(a 2-core host running compute, I/O and the optimizer at once), the rates carry the sharing: the
planner's are timed inside real steps (fuyou.planning.calibrate), the profiler's are fitted to a
step's own events (fit_rates).
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .graph import KINDS, Graph, Task
from .trace import Trace, TraceEvent

_BANDWIDTH_FIELD = {"read": "read_Bps", "write": "write_Bps", "h2d": "h2d_Bps", "d2h": "d2h_Bps", "collective": "collective_Bps"}


@dataclass(frozen=True, kw_only=True)
class Rates:
    """Throughput of each resource of a machine, and fixed per-task costs."""

    read_Bps: float  # storage read bandwidth, bytes/s
    write_Bps: float  # storage write bandwidth (fsync included), bytes/s
    h2d_Bps: float  # host -> device copy bandwidth, bytes/s
    d2h_Bps: float  # device -> host copy bandwidth, bytes/s
    compute_flops: float  # model FLOP/s of the compute lane (model FLOPs, not hardware peak)
    optim_params_per_s: float  # optimizer updates per second (parameters)
    latency_s: Mapping[str, float] = field(default_factory=dict)  # fixed cost per task, by kind
    compute_call_s: float = 0.0  # fixed cost per micro-batch call inside a compute task
    commit_file_s: float = 0.0  # cost per file a commit deletes (meta "files" of a commit task)
    commit_byte_s: float = 0.0  # cost per byte of the files a commit deletes (meta "freed_bytes": freeing their extents)
    copy_Bps: float = 8e9  # host memory copy bandwidth of one thread (reads served by the block cache)
    # Optimizer params/s of the compressed codecs, by "<moments>/<master>[/fp8]" (e.g. "fp8/bf16+rem");
    # optim_params_per_s is the fp32 one. See for_codec.
    optim_by_codec: Mapping[str, float] = field(default_factory=dict)
    # Bytes per second one rank moves through a collective (a reduce or a broadcast between ranks).
    # The default is a 10 Gbit/s network; `fuyou profile` fits it from a traced data-parallel step.
    collective_Bps: float = 1.25e9
    # Compute measured per kind of work on a model's own blocks (fuyou.planning.calibrate): kind ->
    # [FLOP/s, seconds per call]. A compute task whose meta "work" has an entry is timed by it.
    compute_by_work: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # Host -> device bytes/s by the compute weights' codec (meta "codec" of an h2d task): the lane
    # decodes what it copies (fp8 tiles are dequantized on the host), at a rate of its own.
    h2d_by_codec: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "latency_s":
                bad = {k: x for k, x in v.items() if k not in KINDS or not (x >= 0 and math.isfinite(x))}
                if bad:
                    raise ValueError(f"latency_s {bad} invalid: keys must be task kinds {KINDS}, values finite seconds >= 0")
            elif f.name == "compute_by_work":
                bad = {k: x for k, x in v.items() if len(x) != 2 or not (x[0] > 0 and math.isfinite(x[0]) and x[1] >= 0 and math.isfinite(x[1]))}
                if bad:
                    raise ValueError(f"compute_by_work {bad} invalid: values must be [FLOP/s > 0, seconds per call >= 0]")
            elif f.name in ("optim_by_codec", "h2d_by_codec"):
                bad = {k: x for k, x in v.items() if not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x))}
                if bad:
                    raise ValueError(f"{f.name} {bad} invalid: values must be finite rates > 0")
            elif f.name in ("compute_call_s", "commit_file_s", "commit_byte_s"):
                if not (v >= 0 and math.isfinite(v)):
                    raise ValueError(f"{f.name} must be finite and >= 0, got {v}")
            elif not (v > 0 and math.isfinite(v)):
                raise ValueError(f"rate {f.name} must be finite and > 0, got {v}; measure it with `fuyou probe` or pass it by hand")

    def to_json(self) -> dict:
        d = asdict(self)
        d["latency_s"] = dict(self.latency_s)
        d["optim_by_codec"] = dict(self.optim_by_codec)
        d["compute_by_work"] = {k: list(v) for k, v in self.compute_by_work.items()}
        d["h2d_by_codec"] = dict(self.h2d_by_codec)
        return d

    @staticmethod
    def codec_key(moments: str, master: str, weights: str = "bf16") -> str:
        """The key of optim_by_codec for a moments/master codec pair ("<moments>/<master>"), and
        "<moments>/<master>/fp8" for fp8 compute weights, whose tiles the optimizer encodes after
        the update (fp32 and bf16 weights come out of the update itself at no extra cost)."""
        return f"{moments}/{master}/fp8" if weights == "fp8" else f"{moments}/{master}"

    def for_codec(self, moments: str, master: str, weights: str = "bf16") -> "Rates":
        """These rates with the optimizer rate measured for that codec, when one was. fp8 weights
        without a rate of their own add what they cost over fp32 weights in fp32 mode
        ("fp32/fp32/fp8" against optim_params_per_s: the tiles' encode per parameter)."""
        own = self.optim_by_codec.get(self.codec_key(moments, master, weights))
        if own is not None:
            return self.replace(optim_params_per_s=float(own))
        base = self.optim_by_codec.get(self.codec_key(moments, master), self.optim_params_per_s)
        tiles = self.optim_by_codec.get(self.codec_key("fp32", "fp32", "fp8"))
        if weights == "fp8" and tiles is not None:
            extra = max(1.0 / tiles - 1.0 / self.optim_params_per_s, 0.0)  # seconds per parameter
            base = 1.0 / (1.0 / base + extra)
        return self if base == self.optim_params_per_s else self.replace(optim_params_per_s=float(base))

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> "Rates":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown rate field(s) {sorted(unknown)}; known: {sorted(names)}")
        kw = dict(d)
        kw["latency_s"] = dict(kw.get("latency_s") or {})
        kw["optim_by_codec"] = dict(kw.get("optim_by_codec") or {})
        kw["compute_by_work"] = {k: tuple(v) for k, v in (kw.get("compute_by_work") or {}).items()}
        kw["h2d_by_codec"] = dict(kw.get("h2d_by_codec") or {})
        return cls(**kw)

    def replace(self, **changes) -> "Rates":
        d = self.to_json()
        d.update(changes)
        return Rates.from_json(d)

    def task_seconds(self, task: Task) -> float:
        lat = float(self.latency_s.get(task.kind, 0.0))
        if task.kind in _BANDWIDTH_FIELD:
            copied = int(task.meta.get("copy_bytes", 0))  # served from host memory, not the device
            rate = getattr(self, _BANDWIDTH_FIELD[task.kind])
            if task.kind == "h2d":
                rate = self.h2d_by_codec.get(task.meta.get("codec", ""), rate)
            return lat + task.nbytes / rate + copied / self.copy_Bps
        if task.kind == "compute":
            calls = int(task.meta.get("calls", 1))
            measured = self.compute_by_work.get(task.meta.get("work", ""))
            if measured is not None:  # measured on this kind of work: its own rate and cost per call
                return calls * measured[1] + task.flops / measured[0]
            return lat + calls * self.compute_call_s + task.flops / self.compute_flops
        if task.kind == "optim":
            numel = task.meta.get("numel")
            written = int(task.meta.get("write_bytes", 0)) / self.write_Bps  # what the task writes besides updating (a kept gradient)
            if numel is not None:
                return lat + int(numel) / self.optim_params_per_s + written
            # No parameter count: an optimizer pass is bound by the host memory it streams;
            # 16 bytes per parameter (fp32 master, two moments, gradient) turns it into params.
            return lat + task.nbytes / 16 / self.optim_params_per_s
        return lat + int(task.meta.get("files", 0)) * self.commit_file_s + int(task.meta.get("freed_bytes", 0)) * self.commit_byte_s  # commit, delete


@dataclass
class Prediction:
    """What the simulation says about one run of a graph."""

    step_s: float  # makespan
    busy_s: Dict[str, float]  # per lane: total task time
    critical_s: Dict[str, float]  # per lane: its share of the critical path (sums to step_s)
    bytes: Dict[str, int]  # per lane: bytes moved
    trace: Trace  # simulated events (origin 0)

    @property
    def bottleneck(self) -> str:
        """The lane holding most of the critical path (what to speed up first)."""
        return max(self.critical_s, key=lambda k: (self.critical_s[k], self.busy_s.get(k, 0.0))) if self.critical_s else ""

    def busy_fraction(self) -> Dict[str, float]:
        return {k: (v / self.step_s if self.step_s > 0 else 0.0) for k, v in self.busy_s.items()}


def predict(graph: Graph, rates: Rates, lanes: Optional[Mapping[str, int]] = None, step: Optional[int] = None) -> Prediction:
    """Simulate `graph` on `rates` with `lanes` threads per lane (default one each)."""
    durations = [rates.task_seconds(t) for t in graph.tasks]
    return simulate(graph, durations, lanes, step)


def simulate(graph: Graph, durations: List[float], lanes: Optional[Mapping[str, int]] = None, step: Optional[int] = None) -> Prediction:
    """List-schedule `graph` with the given task durations (seconds); see the module docstring."""
    tasks = graph.tasks
    if len(durations) != len(tasks):
        raise ValueError(f"{len(durations)} durations for {len(tasks)} tasks")
    index = {id(t): i for i, t in enumerate(tasks)}
    dependents: List[List[int]] = [[] for _ in tasks]
    waiting = [len(t.deps) for t in tasks]
    for i, t in enumerate(tasks):
        for d in t.deps:
            dependents[index[id(d)]].append(i)
    threads = {lane: max(1, int((lanes or {}).get(lane, 1))) for lane in graph.lanes()}
    free = dict(threads)
    queues: Dict[str, deque] = {lane: deque() for lane in threads}
    start = [0.0] * len(tasks)
    end = [0.0] * len(tasks)
    cause: List[Optional[int]] = [None] * len(tasks)  # the task whose end let this one start
    lane_last: Dict[str, Optional[int]] = {lane: None for lane in threads}
    ready_by: List[Optional[int]] = [None] * len(tasks)
    running: list = []  # heap of (end, index)

    def dispatch(now: float) -> None:
        for lane, q in queues.items():
            while q and free[lane]:
                i = q.popleft()
                free[lane] -= 1
                start[i], end[i] = now, now + durations[i]
                # Started at a lane-freeing event or at its own readiness: remember which.
                cause[i] = ready_by[i] if (ready_by[i] is not None and end[ready_by[i]] >= now) else lane_last[lane]
                heapq.heappush(running, (end[i], i))

    for i, t in enumerate(tasks):
        if not t.deps:
            queues[t.lane].append(i)
    dispatch(0.0)
    done = 0
    while running:
        now, i = heapq.heappop(running)
        batch = [i]
        while running and running[0][0] == now:
            batch.append(heapq.heappop(running)[1])
        newly = []
        for j in batch:
            done += 1
            free[tasks[j].lane] += 1
            lane_last[tasks[j].lane] = j
            for k in dependents[j]:
                waiting[k] -= 1
                if waiting[k] == 0:
                    ready_by[k] = max((index[id(d)] for d in tasks[k].deps), key=lambda x: end[x])
                    newly.append(k)
        for k in sorted(newly):
            queues[tasks[k].lane].append(k)
        dispatch(now)
    if done != len(tasks):
        raise ValueError("the graph has a dependency cycle: some tasks never became ready")
    return _summarize(graph, start, end, cause, step)


def _summarize(graph: Graph, start: List[float], end: List[float], cause: List[Optional[int]], step: Optional[int]) -> Prediction:
    tasks = graph.tasks
    busy: Dict[str, float] = {lane: 0.0 for lane in graph.lanes()}
    moved: Dict[str, int] = {lane: 0 for lane in graph.lanes()}
    trace = Trace()
    trace.origin_ns = 0
    for i, t in enumerate(tasks):
        busy[t.lane] += end[i] - start[i]
        moved[t.lane] += t.nbytes if t.kind != "optim" else 0
        trace.record(TraceEvent(t.name, t.kind, t.lane, int(round(start[i] * 1e9)), int(round(end[i] * 1e9)), t.nbytes, t.flops, step, dict(t.meta)))
    critical: Dict[str, float] = {lane: 0.0 for lane in graph.lanes()}
    makespan = max(end, default=0.0)
    if tasks:
        i: Optional[int] = max(range(len(tasks)), key=lambda x: (end[x], x))
        while i is not None:
            critical[tasks[i].lane] += end[i] - start[i]
            i = cause[i]
    return Prediction(makespan, busy, critical, moved, trace)


def fit_rates(events: Iterable[TraceEvent], base: Rates) -> Rates:
    """Rates that reproduce the measured task durations: per kind, a least-squares line
    duration = latency + size / rate over the events (size: bytes, FLOPs or parameters), falling
    back to size-weighted means where the sizes do not vary. Kinds absent keep `base`'s values."""
    by_kind: Dict[str, List[tuple]] = {}
    copies = [0.0, 0.0]  # reads the block cache served alone: bytes, seconds (they fit copy_Bps)
    for e in events:
        copied = int(e.meta.get("copy_bytes", 0) or 0)
        if e.kind == "read" and copied and not e.nbytes:
            copies[0] += copied
            copies[1] += e.duration_s
            continue
        if e.kind == "optim":
            size = float(e.meta.get("numel", e.nbytes / 16))
        elif e.kind == "compute":
            size = float(e.flops)
        else:
            size = float(e.nbytes)
        by_kind.setdefault(e.kind, []).append((size, e.duration_s))
    changes: Dict[str, object] = {}
    latency = dict(base.latency_s)
    for kind, pts in by_kind.items():
        if kind == "commit":
            latency[kind] = sum(d for _s, d in pts) / len(pts)
            continue
        fit = fit_line(pts)
        if fit is None:
            continue
        lat, rate = fit
        latency[kind] = lat
        name = _BANDWIDTH_FIELD.get(kind) or {"compute": "compute_flops", "optim": "optim_params_per_s"}[kind]
        changes[name] = rate
    changes["latency_s"] = latency
    if copies[0] > 0 and copies[1] > 0:
        changes["copy_Bps"] = copies[0] / copies[1]
    if "compute" in by_kind:
        changes["compute_call_s"] = 0.0  # folded into the fitted compute latency
    return base.replace(**changes)


def fit_line(pts: List[tuple]) -> Optional[tuple]:
    """(intercept >= 0, 1/slope) of duration against size; None when no size is positive."""
    pts = [(s, d) for s, d in pts if d >= 0]
    total_s = sum(s for s, _ in pts)
    if total_s <= 0:
        return None
    n = len(pts)
    ms = total_s / n
    md = sum(d for _, d in pts) / n
    var = sum((s - ms) ** 2 for s, _ in pts)
    if n >= 3 and var > 0:
        slope = sum((s - ms) * (d - md) for s, d in pts) / var
        intercept = md - slope * ms
        if slope > 0 and intercept >= 0:
            return intercept, 1.0 / slope
        if slope > 0:  # a negative intercept is noise: pass the line through the origin
            return 0.0, sum(s * s for s, _ in pts) / sum(s * d for s, d in pts)
    total_d = sum(d for _, d in pts)
    return (0.0, total_s / total_d) if total_d > 0 else None
