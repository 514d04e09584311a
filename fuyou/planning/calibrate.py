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
"""
from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..config import BatchConfig, MemoryConfig, OptimConfig, StateConfig
from ..data.dataset import Batch
from ..model.importer import import_model
from ..model.skeleton import Skeleton
from ..model.source import ModelSource
from ..optim.state import StateCodecs
from ..step.runtime import Runtime
from ..store.store import open_store

CALIBRATION_LAYERS = 2  # the layers' tasks repeat: two of them give their rates without the whole model
STEPS = 4  # the first warms up; the compute tasks of the others are the points
SWEEPS = 2  # each (backward mode, size) measured twice, in opposite orders; the medians per size take both


def calibrate_compute(hf_config, *, device: torch.device, seq_len: int, rows: Sequence[int] = (1, 2, 4), store_dir: str,
                      log: Callable[[str], None] = lambda _s: None) -> Dict[str, Tuple[float, float]]:
    """{work: (FLOP/s, seconds per call)} of `hf_config`'s blocks at micro-batches of `rows`
    sequences of `seq_len` tokens, both backward modes (keep, recompute)."""
    cfg = copy.deepcopy(hf_config)
    cfg.num_hidden_layers = min(CALIBRATION_LAYERS, hf_config.num_hidden_layers)
    points: Dict[str, List[Tuple[float, float]]] = {}
    root = tempfile.mkdtemp(prefix="fuyou-calibrate-", dir=store_dir)
    try:
        store_path = f"{root}/store"
        import_model(ModelSource.from_config(cfg, "calibration"), store_path, StateConfig())
        runs = [(recompute, n) for recompute in ("never", "always") for n in rows]
        for sweep in range(SWEEPS):  # forward, then backward: a slow spell of a shared machine hits each size once
            for recompute, n in runs if sweep % 2 == 0 else runs[::-1]:
                log(f"compute on the model's blocks: {n} x {seq_len} tokens per micro-batch, recompute {recompute} "
                    f"(sweep {sweep + 1} of {SWEEPS}) ...")
                for work, calls, flops, seconds in _compute_tasks(cfg, store_path, device, n, seq_len, recompute):
                    points.setdefault(work, []).append((flops / calls, seconds / calls))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {work: _line(pts) for work, pts in points.items()}


def _compute_tasks(cfg, store_path: str, device: torch.device, rows: int, seq_len: int, recompute: str):
    """(work, calls, flops, seconds) of every compute task of the steps after the first."""
    store = open_store(store_path, StateCodecs.from_json)
    batch = BatchConfig(batch_size=2 * rows, micro_batches=2, seq_len=seq_len)
    # Streaming from the store, as a run does: the read lane's checksums share the cores with compute.
    rt = Runtime(store, Skeleton(cfg), device=device, memory=MemoryConfig(recompute=recompute, cache_mem_bytes=0), batch=batch, optim=OptimConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    try:
        out = []
        for step in range(STEPS):
            ids = torch.randint(0, cfg.vocab_size, (batch.batch_size, seq_len), generator=g)
            res = rt.step(Batch(ids, ids.clone(), None))
            if step:
                out += [(e.meta["work"], batch.micro_batches, e.flops, e.duration_s) for e in res.events if e.kind == "compute" and "work" in e.meta]
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
