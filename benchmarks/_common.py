"""Shared pieces of the benchmark scripts: machine description, medians, per-process counters and
Markdown tables. Importable without torch (the orchestrating processes stay small)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
SHARED_NOTE = "The machine is shared with other busy jobs: timings are noisy; medians over several steps/runs are reported."


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_kib_field(path: str, key: str) -> Optional[int]:
    """Bytes of a "key: N kB" line of a /proc file, or None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ram_bytes() -> int:
    found = _proc_kib_field("/proc/meminfo", "MemTotal:")
    return found if found is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_name() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> Dict[str, str]:
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": fmt_bytes(ram_bytes()),
        "gpu": gpu_name() or "none",
        "python": platform.python_version(),
        "date": utc_now(),
    }
    try:
        import torch  # only when the caller already pays for it

        if "torch" in sys.modules:
            info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def machine_line(info: Optional[Dict[str, str]] = None) -> str:
    info = info or machine_info()
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def median(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median of no values; run at least one step/repeat")
    return statistics.median(vals)


def ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or base is None or base <= 0:
        return "n/a"
    return f"{value / base:.2f}x"


def report_path(out: Optional[str], quick: bool, name: str) -> Optional[str]:
    """Where a benchmark writes its report: `out` when given; else benchmarks/results/<name> for a
    full run, nowhere for a --quick smoke run (it prints, the saved full-run table stays)."""
    if out or quick:
        return out or None
    return os.path.join(RESULTS_DIR, name)


def write_report(text: str, out: Optional[str]) -> None:
    """Print a benchmark's report and, when `out` is given, write it there (folders created)."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are str()-ed and '|' escaped."""

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- per-process counters (Linux /proc; the benchmark workers run one trainer per process) ----


def io_bytes() -> Dict[str, int]:
    """Bytes this process (all its threads) caused to be read from / sent to the storage layer.

    /proc/self/io read_bytes/write_bytes count block-device traffic (O_DIRECT and page-cache
    writeback alike), not page-cache hits: the same meter for every trainer."""
    out = {"read_bytes": 0, "write_bytes": 0}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    out[k] = int(v)
    except OSError:
        import psutil

        c = psutil.Process().io_counters()
        out = {"read_bytes": c.read_bytes, "write_bytes": c.write_bytes}
    return out


def peak_rss_bytes() -> int:
    """High-water resident set size of this process image (VmHWM: reset at exec, so per worker)."""
    found = _proc_kib_field("/proc/self/status", "VmHWM:")
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_python(args: List[str], *, timeout: Optional[float] = None, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `python args...` from the repository root with the worktree first on sys.path."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
