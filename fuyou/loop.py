"""The step loop of a run: train until the store reaches the target step, validating, logging metrics
and writing checkpoints on the way; stop cleanly on SIGINT/SIGTERM after the step in flight."""
from __future__ import annotations

import dataclasses
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
from .export import write_checkpoint
from .data.dataset import TokenDataset
from .dist.group import RankGroup
from .dist.ranks import rows_of
from .model.skeleton import count_targets
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

    SIGNALS = ("SIGTERM", "SIGINT")  # what stops a run (a later one wins where ranks got different ones)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}

    def agree(self, trainer) -> Optional[str]:
        """The signal the trainer's processes stop for now (a rank may stop for another's); one that
        arrives while they agree is kept for the next time."""
        agreed = trainer.stopping(self.requested)
        if agreed:
            self.requested = agreed
        return agreed

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


class StoreTrainer:
    """A full fine-tune: the runtime trains every weight and commits each step in the store.
    `group`: the ranks of a data-parallel run; each trains on its rows of every batch."""

    def __init__(self, rt: Runtime, store: Store, group: Optional[RankGroup] = None):
        self.rt, self.store, self.group = rt, store, group

    @property
    def step_count(self) -> int:
        return self.store.step

    @property
    def root(self) -> str:
        return self.store.root

    @property
    def train_meta(self) -> dict:
        return self.store.manifest["train"]

    def numel(self) -> int:
        return self.store.numel()

    def step(self, batch, meta: dict) -> StepResult:
        try:
            if self.group is None:
                return self.rt.step(batch, train_meta=meta)
            res = self.rt.step(rows_of(batch, self.group), train_meta=meta, targets=count_targets(batch.labels))
            return dataclasses.replace(res, tokens=int(batch.input_ids.numel()))
        except OSError as exc:
            raise StoreIOError(f"{exc}; the store {self.store.root} still holds step {self.store.step}: fix the cause (free space, check the "
                               "disk), then rerun with --resume") from exc

    def save(self, out: str, dtype: str) -> None:
        write_checkpoint(self.store, out, dtype)

    def evaluate(self, batch) -> tuple:
        """(loss summed over the batch's label tokens, their count); ranks: over every rank's rows."""
        if self.group is None:
            return self.rt.evaluate(batch)
        rows = rows_of(batch, self.group)
        loss_sum, targets = self.rt.evaluate(rows) if rows.input_ids.shape[0] else (0.0, 0)
        return self.group.sum(loss_sum), int(self.group.sum(targets))

    def stopping(self, requested: Optional[str]) -> Optional[str]:
        """The signal that stops the run before its next step, if any (ranks: one any rank got, so
        every rank stops after the same step)."""
        return requested if self.group is None else self.group.first(requested, StopFlag.SIGNALS)


@dataclass
class Loop:
    """What the loop runs on: the job's settings and record, the trainer (the runtime over a full
    store, or LoRA adapters over a frozen base), the data (training and validation rows)."""

    cfg: FinetuneConfig
    record: dict
    trainer: object  # StoreTrainer or lora.trainer.LoraTrainer
    dataset: TokenDataset
    eval_set: Optional[TokenDataset]
    console: object


def run(loop: Loop, import_s: float) -> FinetuneResult:
    cfg, trainer = loop.cfg, loop.trainer
    rt = trainer.rt
    res = FinetuneResult([], trainer.root, trainer.numel(), 0, {}, import_s, cfg.steps)
    proc, metrics = psutil.Process(), MetricsLog(trainer.root, cfg.output.tensorboard)
    res.metrics_path, res.peak_rss_bytes = metrics.path, proc.memory_info().rss
    position = int(trainer.train_meta.get("data_position", 0))
    stop, skipped, t0, hits = StopFlag(), 0, time.perf_counter(), rt.cache.hit_bytes
    try:
        with stop, Progress(loop.console, trainer.step_count, cfg.steps, trainer.numel(), cfg.output.log_every) as bar:
            while trainer.step_count < cfg.steps and not stop.agree(trainer):
                batch = loop.dataset.batch(position, cfg.batch.batch_size)
                position += cfg.batch.batch_size
                # Rows consumed: the data order is a function of (seed, position).
                step = trainer.step(batch, {"run": loop.record, "data_position": position})
                skipped = skipped + 1 if step.status == "skipped" else 0
                if skipped:
                    bar.note(f"warning: non-finite gradient at step {step.step + 1}; skipped the batch, state unchanged")
                if skipped >= MAX_SKIPPED_IN_A_ROW:
                    raise FloatingPointError(
                        f"{skipped} steps in a row had a non-finite gradient; {trainer.root} still holds step {trainer.step_count}: lower --lr, "
                        "check the data, or check the store's weights (run without --no-verify)")
                res.steps.append(step)
                res.peak_rss_bytes = max(res.peak_rss_bytes, proc.memory_info().rss)
                bar.update(step)
                metrics.write(step_row(step, numel=trainer.numel(), tokens_per_s=bar.tokens_per_s(), cache_read_bytes=rt.cache.hit_bytes - hits,
                                       peak_rss_bytes=res.peak_rss_bytes, device_peak_bytes=rt.dev_pool.peak_bytes))
                hits = rt.cache.hit_bytes
                if step.status != "skipped":
                    _after_commit(loop, res, metrics, bar, final=trainer.step_count >= cfg.steps)
            if stop.requested and trainer.step_count < cfg.steps:
                flag = "--run-dir" if cfg.peft.method else "--store"
                bar.note(f"stopped by {stop.requested} at step {trainer.step_count} of {cfg.steps}; it is resumable: "
                         f"fuyou finetune {flag} {trainer.root} --resume")
    finally:
        metrics.close()
    res.train_seconds = time.perf_counter() - t0
    res.pool_peaks = {p.name: p.report() for p in (rt.cpu_pool, rt.dev_pool, rt.cache_pool)}
    res.stopped = stop.requested if trainer.step_count < cfg.steps else None
    return res


def _after_commit(loop: Loop, res: FinetuneResult, metrics: MetricsLog, bar: Progress, *, final: bool) -> None:
    """Validation and checkpoints that fall due at the step just committed."""
    cfg, step = loop.cfg, loop.trainer.step_count
    if loop.eval_set is not None and (final or (cfg.eval.every and step % cfg.eval.every == 0)):
        row = evaluate(loop.trainer, loop.eval_set, cfg.batch.batch_size, step)
        res.evals.append(row)
        metrics.write(row)
        bar.note(f"step {step}: validation loss {row['eval_loss']:.4f}, perplexity {row['eval_perplexity']:.2f}")
    if checkpoints.due(cfg.output, step, final):
        res.checkpoints.append(checkpoints.save(loop.trainer, cfg.output))
        bar.note(f"step {step}: checkpoint {res.checkpoints[-1]}")


def evaluate(trainer, eval_set: TokenDataset, batch_size: int, step: int) -> dict:
    """Mean loss over every validation row (forward only, through the streaming runtime)."""
    t0 = time.perf_counter()
    loss_sum, targets = 0.0, 0
    for batch in eval_set.in_order(batch_size):
        s, n = trainer.evaluate(batch)
        loss_sum, targets = loss_sum + s, targets + n
    loss = loss_sum / max(targets, 1)
    return {"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": targets,
            "eval_s": time.perf_counter() - t0, "time": time.time()}


def save_trace(trace, trace_dir: Optional[str]) -> None:
    if trace is not None and trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        trace.save_chrome(os.path.join(trace_dir, "trace.json"))
