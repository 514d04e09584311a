"""Timing on a shared machine, for `fuyou probe`: many runs, their median and quartiles, and a
background loop that keeps the other lanes of a step busy while one is timed."""
from __future__ import annotations

import statistics
import threading
import time
from typing import Callable, NamedTuple, Optional, Tuple


class Timing(NamedTuple):
    """Seconds of repeated runs: the median, and the quartiles as the spread the rate comes with."""

    median: float
    fast: float  # first quartile
    slow: float  # third quartile

    def rates(self, amount: float) -> Tuple[float, float, float]:
        """(rate, slow rate, fast rate) of `amount` units per run."""
        return amount / self.median, amount / self.slow, amount / self.fast


def time_runs(fn: Callable[[], None], repeats: int, min_s: float = 0.0, max_repeats: int = 200) -> Timing:
    """Seconds of `fn` over at least `repeats` runs and at least `min_s` seconds in all: on a
    shared machine single runs swing several-fold (a 2-thread decoder layer on the 2-vCPU dev box
    under load: 118-2349 ms over 20 runs), so the median needs many samples, and their quartiles
    say how far a rate moves while the machine's load does."""
    times = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start < min_s and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if len(times) < 4:
        return Timing(statistics.median(times), min(times), max(times))
    q1, _q2, q3 = statistics.quantiles(times, n=4)
    return Timing(statistics.median(times), q1, q3)


def median_time(fn: Callable[[], None], repeats: int, min_s: float = 0.0, max_repeats: int = 200) -> float:
    return time_runs(fn, repeats, min_s, max_repeats).median


class Busy:
    """Runs `fn` in a loop on a thread for the duration of a `with` block.

    The lanes of a step run together: on a small host, storage I/O shares cores (and the GIL) with
    the compute and optimizer threads. Rates probed with the other lanes busy are the rates a lane
    gets in a step; rates probed alone overstate it (on the 2-vCPU dev box, by 1.5-4x)."""

    def __init__(self, fn: Optional[Callable[[], None]]):
        self.fn, self.stop, self.thread = fn, threading.Event(), None

    def __enter__(self):
        if self.fn is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def _loop(self):
        while not self.stop.is_set():
            self.fn()

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        return False
