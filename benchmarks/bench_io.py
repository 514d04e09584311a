"""Sequential O_DIRECT read/write of one large file: fuyou's I/O backends beside fio and DeepSpeed.

For each (request size, queue depth) point, every participant reads and writes the same file, in
round robin (the starting participant rotates each run, so the noise of this shared machine hits all
alike), `--runs` times; the table shows medians in GB/s (1e9 B/s) and the ratio to fio's best median
over the grid (fio direct=1, io_uring or libaio). Participants:

  fuyou:<backend>  DirectFile over "uring", "threads", "python" (chunk = request size, queue depth =
                   chunks in flight / threads); one request for the whole file, as the store does;
                   "uring-fixed" = uring with the buffer registered (io_uring fixed buffers)
  fio              direct=1, same file, bs = request size, iodepth = queue depth (skipped if absent)
  deepspeed-aio    DeepSpeed's aio_handle (libaio; block_size, queue_depth; page-locked buffer);
                   JIT-built on first use (~5-7 min, cached in ~/.cache/torch_extensions); skipped
                   with a note when deepspeed or the build is missing
  buffered         plain Python readinto/write of request-size pieces through the page cache (its
                   pages of the file are dropped first with posix_fadvise; queue depth unused)

Writes overwrite the file in place and include an fsync (fio: end_fsync=1). Usage:
  python benchmarks/bench_io.py [--size-gib 2] [--runs 3] [--full] [--dir DIR] [--out results.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._common import cpu_model, write_report  # noqa: E402
from fuyou.store import DirectFile, aligned_empty  # noqa: E402
from fuyou.store.backends import PythonBackend  # noqa: E402
from fuyou.store import engine as fy_engine  # noqa: E402

MiB = 1 << 20
DEFAULT_POINTS = [(1, 16), (4, 8), (8, 8), (16, 4)]  # (request MiB, queue depth): a sweep of a few minutes
FULL_POINTS = [(rs, qd) for rs in (1, 2, 4, 8, 16) for qd in (1, 4, 16, 64)]


def machine_info(path: str) -> list[str]:
    cpu = cpu_model()
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    fs = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout.split()
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip() if shutil.which("fio") else "absent"
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"cpu: {cpu}, {os.cpu_count()} cores; RAM {ram_gib:.1f} GiB; kernel {platform.release()}",
        f"file system of the test file: {' '.join(fs[2:]) if len(fs) > 2 else '?'}; fio {fio}; torch {torch.__version__}",
    ]


# ---------------------------------------------------------------------------------------------
# Participants: each is run(op, rs_bytes, qd) -> seconds for the whole file (op "read" / "write").
class FuyouRunner:
    def __init__(self, backend_name: str, path: str, buf: torch.Tensor):
        self.name = f"fuyou:{backend_name}"
        self.backend_name, self.path, self.buf = backend_name, path, buf
        self._cache = {}

    def _backend(self, rs: int, qd: int):
        key = (rs, qd)
        if key not in self._cache:
            self._cache.clear()  # one engine at a time: its threads idle otherwise
            if self.backend_name == "python":
                self._cache[key] = PythonBackend(threads=qd, chunk_bytes=rs)
            elif self.backend_name == "kvikio":  # kvikio's own thread pool and task size (its defaults)
                from fuyou.store.backends import get_backend

                self._cache[key] = get_backend("kvikio")
            else:
                cfg = fy_engine.EngineConfig(queue_depth=qd, chunk_bytes=rs)
                be = fy_engine.EngineBackend(self.backend_name.replace("-fixed", ""), cfg)
                if self.backend_name.endswith("-fixed") and not be.register_buffers([self.buf]):
                    raise RuntimeError("io_uring refused to register the buffer (RLIMIT_MEMLOCK?)")
                self._cache[key] = be
        return self._cache[key]

    def run(self, op: str, rs: int, qd: int) -> float:
        be = self._backend(rs, qd)
        with DirectFile(self.path, "r" if op == "read" else "w", backend=be) as f:
            t0 = time.perf_counter()
            if op == "read":
                f.pread(self.buf).get()
            else:
                f.pwrite(self.buf).get()
                f.fsync()
            return time.perf_counter() - t0


class FioRunner:
    name = "fio"

    def __init__(self, path: str, size: int, ioengine: str):
        self.path, self.size, self.ioengine = path, size, ioengine

    def run(self, op: str, rs: int, qd: int) -> float:
        cmd = ["fio", "--name=seq", f"--filename={self.path}", f"--rw={op}", f"--bs={rs}", f"--iodepth={qd}",
               f"--ioengine={self.ioengine}", "--direct=1", f"--size={self.size}", "--numjobs=1",
               "--output-format=json"]
        if op == "write":
            cmd.append("--end_fsync=1")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        job = json.loads(out[out.index("{"):])["jobs"][0][op]
        return self.size / job["bw_bytes"]


class DeepSpeedRunner:
    name = "deepspeed-aio"

    def __init__(self, path: str, size: int, threads: int):
        from deepspeed.ops.op_builder import AsyncIOBuilder

        self._mod = AsyncIOBuilder().load(verbose=False)
        self.path, self.size, self.threads = path, size, threads
        self._handle_key = None
        self._buf = None

    def run(self, op: str, rs: int, qd: int) -> float:
        if self._handle_key != (rs, qd):
            self._handle = self._mod.aio_handle(rs, qd, False, True, self.threads)
            self._handle_key = (rs, qd)
            if self._buf is None:  # page-locked, so DeepSpeed does no bounce copy
                self._buf = self._handle.new_cpu_locked_tensor(self.size, torch.empty(0, dtype=torch.uint8))
                self._buf.fill_(0x3C)
        t0 = time.perf_counter()
        if op == "read":
            n = self._handle.sync_pread(self._buf, self.path)
        else:
            n = self._handle.sync_pwrite(self._buf, self.path)
            fd = os.open(self.path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        dt = time.perf_counter() - t0
        if n < 0:
            raise RuntimeError(f"deepspeed aio {op} failed ({n})")
        return dt


class BufferedRunner:
    name = "buffered"

    def __init__(self, path: str, buf: torch.Tensor):
        self.path = path
        self.view = memoryview(buf.numpy())

    def run(self, op: str, rs: int, qd: int) -> float:
        fd = os.open(self.path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold cache, as the O_DIRECT runs see it
        os.close(fd)
        n = len(self.view)
        t0 = time.perf_counter()
        with open(self.path, "rb" if op == "read" else "r+b", buffering=0) as f:
            for start in range(0, n, rs):
                piece = self.view[start : start + rs]
                if op == "read":
                    f.readinto(piece)
                else:
                    f.write(piece)
            if op == "write":
                os.fsync(f.fileno())
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
def build_runners(args, path: str, size: int, buf: torch.Tensor, notes: list[str]):
    runners = []
    for name in args.backends:
        if name in ("uring", "uring-fixed", "threads") and (
                fy_engine._io is None or (name.startswith("uring") and not fy_engine.uring_works())):
            notes.append(f"fuyou:{name} skipped: {'fuyou._io not built' if fy_engine._io is None else 'io_uring unavailable'}")
            continue
        runners.append(FuyouRunner(name, path, buf))
    if args.no_fio:
        notes.append("fio skipped (--no-fio)")
    elif shutil.which("fio"):
        runners.append(FioRunner(path, size, args.fio_engine))
    else:
        notes.append("fio skipped: not installed (apt-get install fio)")
    if args.no_deepspeed:
        notes.append("deepspeed-aio skipped (--no-deepspeed)")
    else:
        try:
            runners.append(DeepSpeedRunner(path, size, args.ds_threads))
        except Exception as exc:  # noqa: BLE001 - not installed, or its JIT build failed
            notes.append(f"deepspeed-aio skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    if not args.no_buffered:
        runners.append(BufferedRunner(path, buf))
    return runners


def run_grid(runners, points, runs: int, size: int):
    """results[(rs_mib, qd, runner, op)] = list of GB/s, one per run (round robin order)."""
    results = {}
    first_of_size = {}
    for p in points:
        first_of_size.setdefault(p[0], p)
    for rs_mib, qd in points:
        for r in range(runs):
            for op in ("write", "read"):
                order = runners[r % len(runners):] + runners[: r % len(runners)]
                for runner in order:
                    if isinstance(runner, BufferedRunner) and first_of_size[rs_mib] != (rs_mib, qd):
                        continue  # queue depth means nothing to it: once per request size is enough
                    dt = runner.run(op, rs_mib * MiB, qd)
                    results.setdefault((rs_mib, qd, runner.name, op), []).append(size / dt / 1e9)
                    print(f"  {rs_mib:>2} MiB qd {qd:>2} run {r} {op:5} {runner.name:14} {size / dt / 1e9:6.2f} GB/s",
                          file=sys.stderr, flush=True)
    return results


def format_tables(results, runners, points) -> list[str]:
    med = {k: statistics.median(v) for k, v in results.items()}
    fio_best = {op: max((v for (rs, qd, n, o), v in med.items() if n == "fio" and o == op), default=None)
                for op in ("read", "write")}

    def ratio(v, op):
        return f"{v / fio_best[op]:.2f}" if fio_best[op] else "-"

    lines = ["| request | qd | participant | read GB/s (runs) | write GB/s (runs) | read / fio best | write / fio best |",
             "|---:|---:|---|---|---|---:|---:|"]
    for rs, qd in points:
        for runner in runners:
            r, w = results.get((rs, qd, runner.name, "read")), results.get((rs, qd, runner.name, "write"))
            if not r:
                continue
            runs_r = ", ".join(f"{x:.2f}" for x in r)
            runs_w = ", ".join(f"{x:.2f}" for x in w)
            lines.append(f"| {rs} MiB | {qd} | {runner.name} | **{statistics.median(r):.2f}** ({runs_r}) | "
                         f"**{statistics.median(w):.2f}** ({runs_w}) | {ratio(statistics.median(r), 'read')} | "
                         f"{ratio(statistics.median(w), 'write')} |")
    lines += ["", "Best median over the grid (point in brackets), ratio to fio's best median:", "",
              "| participant | read GB/s | write GB/s | read / fio | write / fio |", "|---|---|---|---:|---:|"]
    for runner in runners:
        best = {}
        for op in ("read", "write"):
            cands = [(v, rs, qd) for (rs, qd, n, o), v in med.items() if n == runner.name and o == op]
            best[op] = max(cands) if cands else None
        if best["read"] is None:
            continue
        (vr, rr, qr), (vw, rw, qw) = best["read"], best["write"]
        lines.append(f"| {runner.name} | {vr:.2f} [{rr} MiB, qd {qr}] | {vw:.2f} [{rw} MiB, qd {qw}] | "
                     f"{ratio(vr, 'read')} | {ratio(vw, 'write')} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="file size in GiB (2-8 in the issue; default 2)")
    ap.add_argument("--runs", type=int, default=3, help="runs per participant and point (median; >= 3)")
    ap.add_argument("--full", action="store_true", help="request 1-16 MiB x queue depth 1-64 (long)")
    ap.add_argument("--points", default="", help="explicit grid, e.g. '1x8,4x16' (request MiB x queue depth)")
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="directory of the test file (on the disk to measure)")
    ap.add_argument("--backends", default="uring,uring-fixed,threads,python", help="fuyou backends to run")
    ap.add_argument("--fio-engine", default="io_uring", choices=["io_uring", "libaio"])
    ap.add_argument("--ds-threads", type=int, default=1, help="DeepSpeed intra_op_parallelism (its default: 1)")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-buffered", action="store_true")
    ap.add_argument("--out", default="", help="also write the report (markdown) to this file")
    ap.add_argument("--quick", action="store_true", help="256 MiB, one point (4 MiB x 8), no DeepSpeed: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_gib, args.points, args.no_deepspeed = 0.25, "4x8", True
    args.backends = [b for b in args.backends.split(",") if b]
    if args.points:
        points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    else:
        points = FULL_POINTS if args.full else DEFAULT_POINTS
    size = int(args.size_gib * (1 << 30)) // (16 * MiB) * (16 * MiB)  # whole requests at every size
    path = os.path.join(os.path.abspath(args.dir), f".bench_io_{os.getpid()}.dat")

    buf = aligned_empty(size)
    buf.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))  # real bytes, every page touched
    notes: list[str] = []
    try:
        with DirectFile(path, "w") as f:  # the file every participant reads, full size
            f.pwrite(buf).get()
            f.fsync()
        runners = build_runners(args, path, size, buf, notes)
        print(f"file {path}: {size / (1 << 30):.2f} GiB; participants: {', '.join(r.name for r in runners)}",
              file=sys.stderr)
        results = run_grid(runners, points, args.runs, size)
    finally:
        if os.path.exists(path):
            os.remove(path)
    report = ["# fuyou I/O benchmark: sequential O_DIRECT read/write", ""]
    report += [f"- {line}" for line in machine_info(os.path.abspath(args.dir))]
    report += [f"- file: {size / (1 << 30):.2f} GiB, {args.runs} runs per point, round robin; medians in GB/s (1e9 B/s); "
               f"fio ioengine={args.fio_engine} direct=1; deepspeed intra_op_parallelism={args.ds_threads}",
               f"- command: python benchmarks/bench_io.py {' '.join(argv if argv is not None else sys.argv[1:])}"]
    report += [f"- note: {n}" for n in notes] + [""] + format_tables(results, runners, points)
    text = "\n".join(report) + "\n"
    write_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
