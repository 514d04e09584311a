"""Compute rates measured on a model's own blocks, as the runtime runs them.

A decoder layer's FLOPs do not say how long its task takes in a step: the forward that keeps its
activations runs under autograd, the backward from kept activations differs from one that
recomputes, the head's loss and the embedding's gather have costs of their own, and each task
attaches and detaches its weights and saves its inputs while the other lanes share the cores (on
the 2-vCPU dev box a layer's forward took 20 ms in a step against 8 ms alone). So the model is cut
to CALIBRATION_LAYERS decoder layers (its embedding, layers and head at their own shapes, random
weights), imported into a scratch store, and trained a few steps through the runtime, streaming
from the store as a run does, in both backward modes and at three micro-batch sizes, in two sweeps
of opposite order; from the compute tasks of the steps after the first, per kind of work (the step
graph's `work`), a line seconds per call = cost per call + FLOPs per call / rate.
`Rates.compute_by_work` holds the result; the cost model times a compute task of a measured kind
with it.

The same steps time the other lanes as the runtime runs them, at the model's own block sizes and
beside a computing layer: on the dev box a state read took twice what the storage probe's rate
gives (its checksum, the staging, the GIL and the cores shared with compute), and an optimizer
task 2-4x its probed rate (the gradient norm, the codec's setup, the same sharing). So the read
and write lanes' rates and per-task costs are fitted to those tasks (seconds = cost + bytes /
rate), and the optimizer's probed rates (every codec's alike) are scaled by the factor, plus the
per-task cost, that its tasks in those steps took (`in_step_rates`).
"""
from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import BatchConfig, MemoryConfig, OptimConfig, StateConfig
from ..data.dataset import Batch
from ..model.importer import import_model
from ..model.skeleton import Skeleton
from ..model.source import ModelSource
from ..optim.state import StateCodecs
from ..step.runtime import Runtime
from ..store.store import open_store
from scheduler.costmodel import Rates, fit_line

CALIBRATION_LAYERS = 2  # the layers' tasks repeat: two of them give their rates without the whole model
STEPS = 4  # the first warms up; the compute tasks of the others are the points
SWEEPS = 2  # each (backward mode, size) measured twice, in opposite orders; the medians per size take both
MICRO_BATCHES = 2  # per calibration step: each compute task is that many calls


@dataclass
class Calibration:
    """What the calibration steps measured: compute per kind of work {work: (FLOP/s, seconds per
    call)}, and the (size, seconds) of the runtime's own read, write (bytes) and optimizer
    (parameters) tasks."""

    compute_by_work: Dict[str, Tuple[float, float]]
    lane_points: Dict[str, List[Tuple[float, float]]] = field(default_factory=dict)


def calibrate(hf_config, *, device: torch.device, seq_len: int, rows: Sequence[int] = (1, 2, 4), store_dir: str,
              log: Callable[[str], None] = lambda _s: None) -> Calibration:
    """Calibration of `hf_config`'s blocks at micro-batches of `rows` sequences of `seq_len`
    tokens, both backward modes (keep, recompute)."""
    cfg = copy.deepcopy(hf_config)
    cfg.num_hidden_layers = min(CALIBRATION_LAYERS, hf_config.num_hidden_layers)
    points: Dict[str, List[Tuple[float, float]]] = {}
    lanes: Dict[str, List[Tuple[float, float]]] = {"read": [], "write": [], "optim": []}
    root = tempfile.mkdtemp(prefix="fuyou-calibrate-", dir=store_dir)
    try:
        store_path = f"{root}/store"
        import_model(ModelSource.from_config(cfg, "calibration"), store_path, StateConfig())
        runs = [(recompute, n) for recompute in ("never", "always") for n in rows]
        for sweep in range(SWEEPS):  # forward, then backward: a slow spell of a shared machine hits each size once
            for recompute, n in runs if sweep % 2 == 0 else runs[::-1]:
                log(f"compute on the model's blocks: {n} x {seq_len} tokens per micro-batch, recompute {recompute} "
                    f"(sweep {sweep + 1} of {SWEEPS}) ...")
                for e in _step_events(cfg, store_path, device, n, seq_len, recompute):
                    if e.kind == "compute" and "work" in e.meta:
                        points.setdefault(e.meta["work"], []).append((e.flops / MICRO_BATCHES, e.duration_s / MICRO_BATCHES))
                    elif e.kind == "optim" and "numel" in e.meta:
                        lanes["optim"].append((float(e.meta["numel"]), e.duration_s))
                    elif e.kind in ("read", "write") and e.nbytes and not e.meta.get("copy_bytes"):
                        lanes[e.kind].append((float(e.nbytes), e.duration_s))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return Calibration({work: _line(pts) for work, pts in points.items()}, lanes)


def in_step_rates(rates: Rates, spread: Optional[dict], cal: Calibration) -> Tuple[Rates, Optional[dict]]:
    """`rates` with the calibration's compute, and the read, write and optimizer lanes as their
    tasks took them in its steps (see the module docstring); the probe's spread moved with each
    rate it changes (same ratios)."""
    changes: Dict[str, object] = {"compute_by_work": dict(cal.compute_by_work)}
    ratio: Dict[str, float] = {}  # new rate / probed rate, for the spread
    latency = dict(rates.latency_s)
    for kind, name in (("read", "read_Bps"), ("write", "write_Bps")):
        fit = fit_line(cal.lane_points.get(kind, []))
        if fit is not None:
            latency[kind], changes[name] = fit
            ratio[name] = fit[1] / getattr(rates, name)
    scaled = fit_line([(n / rates.optim_params_per_s, d) for n, d in cal.lane_points.get("optim", [])])  # seconds at the probed rate
    if scaled is not None:
        latency["optim"], speed = scaled  # in-step seconds = cost + probed seconds / speed
        changes["optim_params_per_s"] = rates.optim_params_per_s * speed
        changes["optim_by_codec"] = {k: v * speed for k, v in rates.optim_by_codec.items()}
        ratio["optim_params_per_s"] = speed
    changes["latency_s"] = latency
    new = rates.replace(**changes)
    if not spread:
        return new, spread
    moved = {k: [x * ratio[k] for x in v] if k in ratio and isinstance(v, list) else v for k, v in spread.items()}
    if "optim_params_per_s" in ratio and isinstance(spread.get("optim_by_codec"), dict):
        moved["optim_by_codec"] = {k: [x * ratio["optim_params_per_s"] for x in v] for k, v in spread["optim_by_codec"].items()}
    return new, moved


def _step_events(cfg, store_path: str, device: torch.device, rows: int, seq_len: int, recompute: str):
    """The trace events of the steps after the first."""
    store = open_store(store_path, StateCodecs.from_json)
    batch = BatchConfig(batch_size=MICRO_BATCHES * rows, micro_batches=MICRO_BATCHES, seq_len=seq_len)
    # Streaming from the store, as a run does: the read lane's checksums share the cores with compute.
    rt = Runtime(store, Skeleton(cfg), device=device, memory=MemoryConfig(recompute=recompute, cache_mem_bytes=0), batch=batch, optim=OptimConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    try:
        out = []
        for step in range(STEPS):
            ids = torch.randint(0, cfg.vocab_size, (batch.batch_size, seq_len), generator=g)
            res = rt.step(Batch(ids, ids.clone(), None))
            if step:
                out += res.events
        return out
    finally:
        rt.close()


def _line(points: List[Tuple[float, float]]) -> Tuple[float, float]:
    """(rate, cost per call) of seconds = cost + flops / rate through the points (medians per size).
    A kind without FLOPs (the embedding's gather) is all cost per call (its rate, 1, times nothing);
    one measured at a single size, or whose larger size was not slower, all rate."""
    by_size: Dict[float, List[float]] = {}
    for flops, seconds in points:
        by_size.setdefault(flops, []).append(seconds)
    sizes = sorted((f, statistics.median(s)) for f, s in by_size.items())
    f_top, s_top = sizes[-1]
    if f_top == 0:
        return 1.0, s_top
    n = len(sizes)
    mf, ms = sum(f for f, _ in sizes) / n, sum(s for _, s in sizes) / n
    var = sum((f - mf) ** 2 for f, _ in sizes)
    slope = sum((f - mf) * (s - ms) for f, s in sizes) / var if var else 0.0
    if slope <= 0:
        return f_top / s_top, 0.0
    cost = ms - slope * mf  # least squares through the sizes' medians
    if cost < 0:  # noise: through the largest size, no cost per call
        return f_top / s_top, 0.0
    return 1.0 / slope, cost
