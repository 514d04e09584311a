"""A run's metrics: one JSON object per line in `<store>/metrics.jsonl` for every committed step and
every validation, and the same scalars in TensorBoard when asked (`--tensorboard DIR`)."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

METRICS_FILE = "metrics.jsonl"


def step_row(res, *, numel: int, tokens_per_s: float, cache_read_bytes: int, peak_rss_bytes: int, device_peak_bytes: int) -> dict:
    return {
        "step": res.step, "status": res.status, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, "tokens": res.tokens,
        "tokens_per_s": tokens_per_s, "step_s": res.seconds, "bytes_read": res.bytes_read, "bytes_written": res.bytes_written,
        "store_bytes_per_param": (res.bytes_read + res.bytes_written) / max(numel, 1), "cache_read_bytes": cache_read_bytes,
        "peak_rss_bytes": peak_rss_bytes, "device_peak_bytes": device_peak_bytes, "bytes_between_ranks": res.bytes_between_ranks,
        "time": time.time(),
    }


def tensorboard_writer():
    """torch's SummaryWriter, or a one-line error naming the package it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)") from None
    return SummaryWriter


class MetricsLog:
    """Appends rows to the store's metrics file (flushed per row: a killed run keeps what it logged)."""

    def __init__(self, store_root: str, tensorboard_dir: Optional[str] = None):
        self.path = os.path.join(store_root, METRICS_FILE)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard_dir:
            self._tb = tensorboard_writer()(tensorboard_dir)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(("eval/" if key.startswith("eval_") else "train/") + key, value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
