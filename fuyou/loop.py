"""The step loop of a run: train until the store reaches the target step, validating, logging metrics
and writing checkpoints on the way; stop cleanly on SIGINT/SIGTERM after the step in flight."""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import psutil

from . import checkpoints
from .config import FinetuneConfig
from .data.dataset import TokenDataset
from .metrics import MetricsLog, step_row
from .progress import Progress
from .step.runtime import Runtime, StepResult
from .store.store import Store

# A run whose gradients stay non-finite this many steps in a row is stopped: its weights (or data)
# are corrupt or the learning rate is far too high; skipping on would never end.
MAX_SKIPPED_IN_A_ROW = 5


@dataclass
class FinetuneResult:
    steps: List[StepResult]
    store: str
    numel: int
    peak_rss_bytes: int
    pool_peaks: dict
    import_seconds: float
    target_step: int = 0
    stopped: Optional[str] = None  # the signal that stopped the run before its target step
    train_seconds: float = 0.0
    evals: List[dict] = field(default_factory=list)  # validation rows, as metrics.jsonl has them
    checkpoints: List[str] = field(default_factory=list)
    metrics_path: str = ""

    @property
    def first_loss(self) -> float:
        return self.steps[0].loss

    @property
    def last_loss(self) -> float:
        return self.steps[-1].loss


class StoreIOError(OSError):
    """A disk error during a step; the message names the store and how to resume."""


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the step in flight (a second SIGINT interrupts it;
    the store stays at its last committed step either way)."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class Loop:
    """What the loop runs on: the job's settings and record, the runtime over the open store, the
    data (training rows and validation rows, if any)."""

    cfg: FinetuneConfig
    record: dict
    rt: Runtime
    store: Store
    dataset: TokenDataset
    eval_set: Optional[TokenDataset]
    console: object


def run(loop: Loop, import_s: float) -> FinetuneResult:
    cfg, store, rt = loop.cfg, loop.store, loop.rt
    res = FinetuneResult([], store.root, store.numel(), 0, {}, import_s, cfg.steps)
    proc, metrics = psutil.Process(), MetricsLog(store.root, cfg.output.tensorboard)
    res.metrics_path, res.peak_rss_bytes = metrics.path, proc.memory_info().rss
    position = int(store.manifest["train"].get("data_position", 0))
    stop, skipped, t0, hits = StopFlag(), 0, time.perf_counter(), rt.cache.hit_bytes
    try:
        with stop, Progress(loop.console, store.step, cfg.steps, store.numel(), cfg.output.log_every) as bar:
            while store.step < cfg.steps and not stop.requested:
                batch = loop.dataset.batch(position, cfg.batch.batch_size)
                position += cfg.batch.batch_size
                # Rows consumed: the data order is a function of (seed, position).
                step = _step(rt, store, batch, {"run": loop.record, "data_position": position})
                skipped = skipped + 1 if step.status == "skipped" else 0
                if skipped:
                    bar.note(f"warning: non-finite gradient at step {step.step + 1}; skipped the batch, state unchanged")
                if skipped >= MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(
                        f"{skipped} steps in a row had a non-finite gradient; the store {store.root} still holds step {store.step}: lower --lr, "
                        "check the data, or check the store's weights (run without --no-verify)")
                res.steps.append(step)
                res.peak_rss_bytes = max(res.peak_rss_bytes, proc.memory_info().rss)
                bar.update(step)
                metrics.write(step_row(step, numel=store.numel(), tokens_per_s=bar.tokens_per_s(), cache_read_bytes=rt.cache.hit_bytes - hits,
                                       peak_rss_bytes=res.peak_rss_bytes, device_peak_bytes=rt.dev_pool.peak_bytes))
                hits = rt.cache.hit_bytes
                if step.status != "skipped":
                    _after_commit(loop, res, metrics, bar, final=store.step >= cfg.steps)
            if stop.requested and store.step < cfg.steps:
                bar.note(f"stopped by {stop.requested} at step {store.step} of {cfg.steps}; the store is resumable: "
                         f"fuyou finetune --store {store.root} --resume")
    finally:
        metrics.close()
    res.train_seconds = time.perf_counter() - t0
    res.pool_peaks = {p.name: p.report() for p in (rt.cpu_pool, rt.dev_pool, rt.cache_pool)}
    res.stopped = stop.requested if store.step < cfg.steps else None
    return res


def _after_commit(loop: Loop, res: FinetuneResult, metrics: MetricsLog, bar: Progress, *, final: bool) -> None:
    """Validation and checkpoints that fall due at the step just committed."""
    cfg, step = loop.cfg, loop.store.step
    if loop.eval_set is not None and (final or (cfg.eval.every and step % cfg.eval.every == 0)):
        row = evaluate(loop.rt, loop.eval_set, cfg.batch.batch_size, step)
        res.evals.append(row)
        metrics.write(row)
        bar.note(f"step {step}: validation loss {row['eval_loss']:.4f}, perplexity {row['eval_perplexity']:.2f}")
    if checkpoints.due(cfg.output, step, final):
        res.checkpoints.append(checkpoints.save(loop.store, cfg.output))
        bar.note(f"step {step}: checkpoint {res.checkpoints[-1]}")


def evaluate(rt: Runtime, eval_set: TokenDataset, batch_size: int, step: int) -> dict:
    """Mean loss over every validation row (forward only, through the streaming runtime)."""
    t0 = time.perf_counter()
    loss_sum, targets = 0.0, 0
    for batch in eval_set.in_order(batch_size):
        s, n = rt.evaluate(batch)
        loss_sum, targets = loss_sum + s, targets + n
    loss = loss_sum / max(targets, 1)
    return {"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": targets,
            "eval_s": time.perf_counter() - t0, "time": time.time()}


def _step(rt: Runtime, store: Store, batch, meta: dict) -> StepResult:
    try:
        return rt.step(batch, train_meta=meta)
    except OSError as exc:
        raise StoreIOError(
            f"{exc}; the store {store.root} still holds step {store.step}: fix the cause (free space, check the disk), then rerun with --resume"
        ) from exc


def save_trace(trace, trace_dir: Optional[str]) -> None:
    if trace is not None and trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        trace.save_chrome(os.path.join(trace_dir, "trace.json"))
