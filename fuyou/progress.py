"""The console side of a run: a progress bar on a terminal, a line per report otherwise, and the
final summary."""
from __future__ import annotations

import sys
import time

from .memory import format_bytes


class Progress:
    """A rich progress bar (step, loss, tokens/s, GB read/written, RSS); plain lines when not a TTY."""

    def __init__(self, console, start_step: int, target_step: int, numel: int):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.start, self.total, self.numel = start_step, target_step, numel
        self.read = self.written = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self.tokens = 0
        self._prog = None

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.console.is_terminal:
            self._prog = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._prog.__enter__()
            self._task = self._prog.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, res, rss: int) -> None:
        self.done += 1
        self.read += res.bytes_read
        self.written += res.bytes_written
        self.tokens += res.tokens
        tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        info = (
            f"loss {res.loss:.4f}  {tps:,.0f} tok/s  read {self.read / 1e9:.2f} GB  written {self.written / 1e9:.2f} GB  "
            f"{(res.bytes_read + res.bytes_written) / max(self.numel, 1):.1f} B/param/step  RSS {format_bytes(rss)}"
        )
        if self._prog is not None:
            self._prog.update(self._task, completed=res.step, info=info)
        elif self.done == 1 or res.step == self.total or self.done % max(1, (self.total - self.start) // 10) == 0:
            self.console.print(f"step {res.step}/{self.total}  {info}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def __exit__(self, *exc):
        if self._prog is not None:
            self._prog.__exit__(*exc)
        return False


def print_summary(res, console=None) -> None:
    from rich.console import Console

    console = console or Console(stderr=True)
    if not res.steps:
        if res.stopped:
            console.print(f"stopped by {res.stopped} before a step ran; store {res.store}", highlight=False)
        return
    last = res.steps[-1]
    per_step = sorted(s.seconds for s in res.steps)[len(res.steps) // 2]
    console.print(
        f"done: {len(res.steps)} steps, loss {res.first_loss:.4f} -> {res.last_loss:.4f}; median step {per_step:.3f} s; "
        f"store traffic {(last.bytes_read + last.bytes_written) / max(res.numel, 1):.1f} B/param/step "
        f"(read {last.bytes_read / 1e6:.1f} MB, written {last.bytes_written / 1e6:.1f} MB); peak RSS {format_bytes(res.peak_rss_bytes)}; "
        + "; ".join(f"{k} pool peak {format_bytes(v['peak_bytes'])} of {format_bytes(v['capacity_bytes'])}" for k, v in res.pool_peaks.items())
        + f"; store {res.store} at step {last.step}",
        highlight=False,
    )
    sys.stderr.flush()
