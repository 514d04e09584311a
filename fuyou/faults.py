"""Crash points for the crash-consistency tests: FUYOU_CRASH_AT="<point>:<n>" kills the process
(SIGKILL, as a power cut would) the n-th time execution reaches <point>.

Points: "read" and "write" (a block file, before the I/O), "optim" (before a block's update),
"commit" (manifest.tmp written, not yet renamed), "committed" (renamed, old versions not yet
deleted), "prepare" / "prepared" (the same for a data-parallel step's prepared manifest),
"journal" (lean mode: a block's journal entry written, not yet renamed), "export" (a checkpoint
written, not yet renamed into place). Unset (the normal case), `crash_point` costs one dictionary
lookup.
"""
from __future__ import annotations

import os
import signal
import threading

_spec = os.environ.get("FUYOU_CRASH_AT")
_target = None
# FUYOU_CRASH_RANK=<r>: only the process of that data-parallel rank (torchrun's RANK) crashes.
_rank = os.environ.get("FUYOU_CRASH_RANK")
if _spec and (_rank is None or _rank == os.environ.get("RANK", "0")):
    _point, _, _n = _spec.partition(":")
    _target = (_point, int(_n or 1))
_counts: dict = {}
_lock = threading.Lock()


def crash_point(point: str) -> None:
    if _target is None or _target[0] != point:
        return
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        hit = _counts[point] == _target[1]
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
