"""The console side of a run: what it is about to do (before step 1), a progress bar with ETA on a
terminal or a line per --log-every steps otherwise (80 columns), and the final summary. Diagnostics
go to stderr; nothing here writes stdout."""
from __future__ import annotations

import sys
import time
from typing import List

from .memory import format_bytes


def _step_line(res, numel: int, tokens_per_s: float) -> str:
    """One step in under 80 columns: step, loss, lr, grad norm, throughput, time, store B/param."""
    norm = f"{res.grad_norm:.3g}" if res.grad_norm == res.grad_norm else "nan"
    return (f"loss {res.loss:.4f} lr {res.lr:.2e} |g| {norm} {tokens_per_s:,.0f} tok/s {res.seconds:.2f} s "
            f"{(res.bytes_read + res.bytes_written) / max(numel, 1):.1f} B/p")


class Progress:
    """A rich progress bar with ETA on a terminal; without one, a line every `log_every` steps
    (0: a tenth of the run), the first and the last."""

    def __init__(self, console, start_step: int, target_step: int, numel: int, log_every: int = 0):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.start, self.total, self.numel = start_step, target_step, numel
        self.log_every = log_every or max(1, (target_step - start_step) // 10)
        self.done, self.tokens, self.t0 = 0, 0, time.perf_counter()
        self._prog = None

    def __enter__(self):
        from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.console.is_terminal:
            self._prog = Bar(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                             TimeRemainingColumn(), console=self.console)
            self._prog.__enter__()
            self._task = self._prog.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, res) -> None:
        self.done += 1
        self.tokens += res.tokens
        info = _step_line(res, self.numel, self.tokens_per_s())
        if self._prog is not None:
            self._prog.update(self._task, completed=res.step, info=info)
        elif self.done == 1 or res.step == self.total or self.done % self.log_every == 0:
            self.console.print(f"step {res.step}/{self.total} {info}", highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def __exit__(self, *exc):
        if self._prog is not None:
            self._prog.__exit__(*exc)
        return False


def run_summary(lines: List[str], console) -> None:
    """What the run is about to do, one concern a line (printed before step 1)."""
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def print_summary(res, console=None) -> None:
    from rich.console import Console

    console = console or Console(stderr=True)
    if not res.steps:
        if res.stopped:
            console.print(f"stopped by {res.stopped} before a step ran; store {res.store}", highlight=False)
        return
    last = res.steps[-1]
    per_step = sorted(s.seconds for s in res.steps)[len(res.steps) // 2]
    tokens = sum(s.tokens for s in res.steps)
    out = [
        f"done: {len(res.steps)} steps, loss {res.first_loss:.4f} -> {res.last_loss:.4f}; median step {per_step:.3f} s; {tokens:,} tokens "
        f"in {res.train_seconds:.1f} s; store {res.store} at step {last.step}",
        f"  store traffic {(last.bytes_read + last.bytes_written) / max(res.numel, 1):.1f} B/param/step (read {last.bytes_read / 1e6:.1f} MB, "
        f"written {last.bytes_written / 1e6:.1f} MB); peak RSS {format_bytes(res.peak_rss_bytes)}; "
        + "; ".join(f"{k} pool peak {format_bytes(v['peak_bytes'])} of {format_bytes(v['capacity_bytes'])}" for k, v in res.pool_peaks.items()),
    ]
    if res.evals:
        best = min(res.evals, key=lambda e: e["eval_loss"])
        out.append(f"  validation loss {res.evals[-1]['eval_loss']:.4f} at step {res.evals[-1]['step']} (best {best['eval_loss']:.4f} at step "
                   f"{best['step']}; perplexity {res.evals[-1]['eval_perplexity']:.2f})")
    out.append(f"  metrics: {res.metrics_path}" + (f"; checkpoints: {', '.join(res.checkpoints)}" if res.checkpoints else ""))
    for line in out:
        console.print(line, highlight=False, soft_wrap=True)
    sys.stderr.flush()
