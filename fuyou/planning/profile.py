"""Where did a step's time go? Reads the Chrome trace `fuyou finetune --trace DIR` writes.

For one step it reports: busy % per resource lane, overlap (share of compute time during which I/O
or the optimizer also ran), the compute lane's stalls by cause (weights read, h2d copy, optimizer
slot, scheduling), bytes moved per tier, and the achieved step time beside the cost model's
prediction. The prediction needs the step's graph, which the trace does not store: it is rebuilt
from the task names and sizes (the runtime's own `build_step_graph`), with the slot counts inferred
as the smallest ones the measured order of tasks respects.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from scheduler.costmodel import Prediction, Rates, fit_rates, predict
from scheduler.trace import TraceEvent

from ..step.graph import TaskName, build_step_graph, bytes_per_step
from ..step.slot_sizes import edge_choices
from ..step.spec import BlockSizes, Consumer, StepSpec, assign_opt_slots, block_indices

IO_KINDS = ("read", "write", "h2d", "d2h")
LANE_ORDER = ("read", "h2d", "compute", "d2h", "optim", "write", "comm", "commit")


def load_chrome_trace(path: str) -> List[TraceEvent]:
    """TraceEvents of a Chrome trace written by scheduler.Trace.save_chrome (times in ns from 0)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read trace {path} ({exc}); pass the trace.json that `fuyou finetune --trace DIR` wrote") from None
    raw = doc.get("traceEvents") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        raise ValueError(f"{path} is not a Chrome trace (no traceEvents list); pass DIR/trace.json from `fuyou finetune --trace DIR`")
    lanes = {e["tid"]: e["args"]["name"] for e in raw if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in raw:
        if e.get("ph") != "X":
            continue
        args = dict(e.get("args") or {})
        nbytes, flops, step = int(args.pop("bytes", 0)), int(args.pop("flops", 0)), args.pop("step", None)
        start = int(round(float(e["ts"]) * 1e3))
        out.append(TraceEvent(e["name"], e.get("cat", ""), lanes.get(e.get("tid"), str(e.get("tid"))), start, start + int(round(float(e["dur"]) * 1e3)), nbytes, flops, step, args))
    if not out:
        raise ValueError(f"{path} holds no task events; run `fuyou finetune --trace DIR` for at least one step")
    return out


def steps_of(events: List[TraceEvent]) -> Dict[int, List[TraceEvent]]:
    out: Dict[int, List[TraceEvent]] = {}
    for e in events:
        out.setdefault(e.step if e.step is not None else 0, []).append(e)
    return out


def pick_step(by_step: Dict[int, List[TraceEvent]], step: Optional[int] = None) -> int:
    """The asked step, else the median-length step among all but the first (warm-up) one."""
    if step is not None:
        if step not in by_step:
            raise ValueError(f"step {step} is not in the trace; it holds steps {sorted(by_step)}")
        return step
    keys = sorted(by_step)
    pool = keys[1:] or keys
    spans = sorted((_span_ns(by_step[k]), k) for k in pool)
    return spans[(len(spans) - 1) // 2][1]


def _span_ns(events: List[TraceEvent]) -> int:
    return max(e.end_ns for e in events) - min(e.start_ns for e in events)


# -- interval arithmetic ---------------------------------------------------------------------------
def _union(iv: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[list] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


def _length(iv) -> int:
    return sum(e - s for s, e in iv)


def _intersect_len(a, b) -> int:
    i = j = total = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, e - s)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# -- the summary -------------------------------------------------------------------------------------
@dataclass
class StepProfile:
    step: int
    step_s: float  # first task start to last task end
    busy: Dict[str, float]  # lane -> fraction of the step it was busy
    overlap: float  # fraction of compute time with I/O or optimizer running too
    stalls_s: Dict[str, float]  # compute-lane idle time by cause
    bytes: Dict[str, int]  # tier link -> bytes
    predicted: Dict[str, float] = field(default_factory=dict)  # rates source -> predicted step seconds
    slots: Dict[str, int] = field(default_factory=dict)  # inferred weight / device / optimizer slots
    prediction: Optional[Prediction] = None  # with the fitted rates


def profile_step(events: List[TraceEvent], rates: Optional[Dict[str, Rates]] = None) -> StepProfile:
    """Summarize one step's events; `rates` {label: Rates} adds predictions ("fitted" always)."""
    t0 = min(e.start_ns for e in events)
    span = max(e.end_ns for e in events) - t0
    lanes: Dict[str, list] = {}
    for e in events:
        lanes.setdefault(e.lane, []).append((e.start_ns, e.end_ns))
    unions = {k: _union(v) for k, v in lanes.items()}
    busy = {k: _length(v) / span if span else 0.0 for k, v in unions.items()}
    comp = unions.get("compute", [])
    others = _union([iv for k, v in unions.items() if k != "compute" and k != "commit" for iv in v])
    overlap = _intersect_len(comp, others) / _length(comp) if _length(comp) else 0.0
    prof = StepProfile(events[0].step or 0, span / 1e9, busy, overlap, compute_stalls(events), bytes_per_step(events))
    graph, slots = graph_from_events(events)
    if graph is not None:
        prof.slots = slots
        base = next(iter((rates or {}).values()), None) or Rates(read_Bps=1e9, write_Bps=1e9, h2d_Bps=1e9, d2h_Bps=1e9, compute_flops=1e9, optim_params_per_s=1e9)
        fitted = fit_rates(events, base)
        prof.prediction = predict(graph, fitted, step=prof.step)
        prof.predicted["fitted from this trace"] = prof.prediction.step_s
        for label, r in (rates or {}).items():
            prof.predicted[label] = predict(graph, r).step_s
    return prof


def compute_stalls(events: List[TraceEvent]) -> Dict[str, float]:
    """Idle time of the compute lane before each compute task, split by what it waited for."""
    comp = sorted((e for e in events if e.kind == "compute"), key=lambda e: e.start_ns)
    by_name = {e.name: e for e in events}
    writes = sorted(e.end_ns for e in events if e.kind == "write")
    stalls = {"weights read": 0.0, "h2d copy": 0.0, "optimizer slot": 0.0, "scheduling": 0.0}
    prev_end = min(e.start_ns for e in events)
    for consumer, c in enumerate(comp):
        g0, g1 = prev_end, c.start_ns
        prev_end = c.end_ns
        if g1 <= g0:
            continue
        read = by_name.get(TaskName.read_weights(consumer, c.meta["block"]))
        h2d = by_name.get(TaskName.h2d(consumer, c.meta["block"]))
        t = g0
        if read is not None and read.end_ns > t:
            stalls["weights read"] += (min(read.end_ns, g1) - t) / 1e9
            t = min(read.end_ns, g1)
        if h2d is not None and h2d.end_ns > t:
            stalls["h2d copy"] += (min(h2d.end_ns, g1) - t) / 1e9
            t = min(h2d.end_ns, g1)
        last_write = max((w for w in writes if t < w <= g1), default=None)
        if last_write is not None and c.meta.get("phase", "") == "bwd":
            stalls["optimizer slot"] += (last_write - t) / 1e9
            t = last_write
        stalls["scheduling"] += (g1 - t) / 1e9
    return stalls


def graph_from_events(events: List[TraceEvent]):
    """(graph, slots) rebuilt from one step's task names and sizes, or (None, {}) if the trace is
    not a step of the runtime's graph. Slot counts: the smallest the measured order respects."""
    comp = sorted((e for e in events if e.kind == "compute"), key=lambda e: e.start_ns)
    by_name = {e.name: e for e in events}
    if not all("phase" in c.meta and "block" in c.meta for c in comp):
        return None, {}
    cons_blocks = [(c.meta["phase"], c.meta["block"]) for c in comp]
    order = [b for p, b in cons_blocks if p == "fwd"]
    if not order or not any(p == "head" for p, _ in cons_blocks):
        return None, {}
    head = next(b for p, b in cons_blocks if p == "head")
    embed = order[0]
    weight_reads = [e for e in events if e.meta.get("role") == "read_weights"]
    blocks: Dict[str, BlockSizes] = {}
    cached = set()  # blocks whose reads the block cache served (their bytes are in meta copy_bytes)
    for b in order + [head]:
        rs, wr, op = by_name.get(TaskName.read_states(b)), by_name.get(TaskName.write(b)), by_name.get(TaskName.optim(b))
        if rs is not None and wr is not None and op is not None:
            states = rs.nbytes + int(rs.meta.get("copy_bytes", 0))
            if rs.meta.get("copy_bytes"):
                cached.add(b)
            blocks[b] = BlockSizes(int(op.meta.get("numel", 0)), wr.nbytes - states, states)
        else:
            rw = next((e for e in weight_reads if e.meta.get("block") == b), None)
            blocks[b] = BlockSizes(0, rw.nbytes if rw else 0, 0)
    head_read = next((e.nbytes + int(e.meta.get("copy_bytes", 0)) for e in weight_reads if e.meta.get("block") == head), 0)
    tied = head_read > blocks[head].weights_bytes and embed in blocks and head_read >= blocks[head].weights_bytes + blocks[embed].weights_bytes
    # What the h2d lane copied of each block (decoded weights): from the first consumer of it; the
    # head's h2d carries the tied embedding's too.
    copies = {}
    for e in events:
        if e.meta.get("role") == "h2d" and e.meta.get("block") not in copies:
            copies[e.meta["block"]] = e.nbytes
    if tied and head in copies and embed in copies:
        copies[head] -= copies[embed]
    blocks = {b: BlockSizes(s.numel, s.weights_bytes, s.states_bytes, copies.get(b)) for b, s in blocks.items()}
    cons = [Consumer(p, b, (b, embed) if (p == "head" and tied) else (b,)) for p, b in cons_blocks]
    flops = [c.flops for c in comp]
    act_out = [e for e in events if e.meta.get("role") == "act_out"]  # offloaded block inputs
    act_bytes = act_out[0].nbytes if act_out else 0
    n_on_ssd = sum(1 for e in act_out if e.kind == "write")
    index = block_indices(cons)
    recomputed_inputs = frozenset(index[c.meta.get("block")] for c in comp if c.meta.get("from_below") and c.meta.get("block") in index)
    has_h2d = any(e.meta.get("role") == "h2d" for e in events)
    ranks = max((int(e.meta.get("ranks", 2)) for e in events if e.kind == "collective"), default=1)
    codec = next((e.meta["codec"] for e in events if e.meta.get("role") == "h2d" and "codec" in e.meta), "fp32")
    kept = any(str(c.meta.get("work", "")).endswith(":keep") for c in comp)
    edges = edge_choices(order + [head], tied)
    for w, d, o, gs in _slot_counts(has_h2d, bool(recomputed_inputs)):
        for edge in edges:
            g = build_step_graph(StepSpec(cons, blocks, w, d, o, assign_opt_slots(cons, edge, o), flops, gs, frozenset(cached),
                                          n_offloaded=len(act_out), act_block_bytes=act_bytes, recomputed_inputs=recomputed_inputs, n_on_ssd=n_on_ssd,
                                          ranks=ranks, weights_codec=codec, kept_forward=kept))
            if _consistent(g, by_name):
                return g, {"weight_slots": w, "device_slots": d, "opt_slots": o, "edge_slot": "+".join(edge) or "none"}
    return None, {}


def _slot_counts(has_h2d: bool, recomputed_inputs: bool):
    """(weight, device, optimizer, gradient) slot counts to try, fewest slots first."""
    for total in range(2, 16):
        for w in range(1, total):
            for o in range(1, 4):
                d = total - w - o if has_h2d else 0
                if (has_h2d and not 1 <= d <= w) or (not has_h2d and w + o != total):
                    continue
                if recomputed_inputs and (w < 2 or (has_h2d and d < 2)):
                    continue  # recomputed inputs need two slots of each (see plan._place_block_inputs)
                for gs in (2, 1):  # gradient slots: two unless the host budget allowed only one
                    yield w, d, o, gs


def _consistent(graph, by_name: Dict[str, TraceEvent]) -> bool:
    for t in graph.tasks:
        e = by_name.get(t.name)
        if e is None:
            return False
        for d in t.deps:
            de = by_name.get(d.name)
            if de is None or e.start_ns < de.end_ns:
                return False
    return True


# -- output ------------------------------------------------------------------------------------------
def draw_timeline(events: List[TraceEvent], path: str, predicted: Optional[Prediction] = None, title: str = "") -> str:
    """PNG: one row per lane, one bar per task (measured; the predicted timeline below it)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the timeline needs matplotlib; install it with pip install 'fuyou[profile]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured", events)]
    if predicted is not None:
        panels.append(("predicted", predicted.trace.events))
    colors = {"read": "tab:blue", "h2d": "tab:cyan", "compute": "tab:green", "d2h": "tab:olive", "optim": "tab:orange", "write": "tab:red",
              "collective": "tab:pink", "commit": "tab:gray"}
    lanes = [l for l in LANE_ORDER if any(e.lane == l for e in events)] + sorted({e.lane for e in events} - set(LANE_ORDER))
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 1.2 + 0.45 * len(lanes) * len(panels)), squeeze=False, sharex=True)
    for ax, (label, evs) in zip(axes[:, 0], panels):
        t0 = min(e.start_ns for e in evs)
        for row, lane in enumerate(lanes):
            bars = [((e.start_ns - t0) / 1e6, max((e.end_ns - e.start_ns) / 1e6, 1e-3)) for e in evs if e.lane == lane]
            kinds = [e.kind for e in evs if e.lane == lane]
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=[colors.get(k, "tab:purple") for k in kinds], edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.invert_yaxis()
        ax.set_ylabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms from step start")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_rows(prof: StepProfile, all_steps_s: Optional[List[float]] = None) -> List[Tuple[str, str]]:
    rows = [("step", str(prof.step)), ("achieved step time", f"{prof.step_s * 1e3:.1f} ms (first task start to last task end)")]
    if all_steps_s:
        rows.append(("median over steps", f"{statistics.median(all_steps_s) * 1e3:.1f} ms ({len(all_steps_s)} steps)"))
    for label, s in prof.predicted.items():
        rows.append((f"predicted ({label})", f"{s * 1e3:.1f} ms ({(s / prof.step_s - 1) * 100:+.1f}% vs achieved)"))
    if prof.slots:
        rows.append(("slots (inferred)", ", ".join(f"{k} {v}" for k, v in prof.slots.items())))
    if prof.prediction is not None:
        rows.append(("bottleneck (model)", prof.prediction.bottleneck))
    for lane in [l for l in LANE_ORDER if l in prof.busy] + sorted(set(prof.busy) - set(LANE_ORDER)):
        rows.append((f"busy {lane}", f"{prof.busy[lane] * 100:.1f}%"))
    rows.append(("overlap", f"{prof.overlap * 100:.1f}% of compute time had I/O or the optimizer running too"))
    for cause, s in prof.stalls_s.items():
        rows.append((f"compute stall: {cause}", f"{s * 1e3:.1f} ms"))
    for tier, n in prof.bytes.items():
        if n or tier != "between ranks":  # a one-process step has no collectives
            rows.append((f"moved {tier}", f"{n / 1e9:.3f} GB"))
    return rows
