"""Store read/write throughput with the checksum pipelined into the I/O, against the same I/O with
the checksum after it (serial) and against raw DirectFile I/O without any checksum (the limit).

    python benchmarks/bench_store.py                 # 256 MiB file, 5 rounds
    python benchmarks/bench_store.py --quick                 # 64 MiB, 3 rounds
    python benchmarks/bench_store.py --mib 1024 --dir /nvme/tmp

Every round times each method once, in turn, on the same file (round-robin, so the machine's load
drifts over all methods alike); the table reports medians. Writes include the fsync.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import SHARED_NOTE, machine_info, machine_line, markdown_table, median, report_path, write_report  # noqa: E402


def make_store(root: str, numel: int):
    """A one-block store whose master file holds `numel` fp32 values."""
    import torch

    from fuyou.config import StateConfig
    from fuyou.optim.state import StateCodecs
    from fuyou.store.store import create_store
    from fuyou.store.manifest import new_manifest

    blocks = [{"name": "blk", "params": [{"name": "w", "shape": [numel], "numel": numel}]}]
    state = StateCodecs(StateConfig())
    store = create_store(root, new_manifest({"source": "bench", "fingerprint": "x"}, state, blocks), state, None)
    lay = store.layouts["blk"].kinds["master"]
    from fuyou.store.directio import aligned_empty

    buf = aligned_empty(lay.file_bytes)
    buf.view(torch.uint8)[: lay.nbytes].random_(0, 256)
    return store, lay, buf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="file size in MiB")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (medians; >= 3)")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="64 MiB, 3 rounds")
    ap.add_argument("--out", default=None, help="report file (default: benchmarks/results/bench_store.md; a --quick run only prints)")
    a = ap.parse_args(argv)
    if a.quick:
        a.mib, a.rounds = 64, 3
    a.out = report_path(a.out, a.quick, "bench_store.md")
    if a.rounds < 3 or a.mib < 1:
        print("bench_store: --rounds must be >= 3 and --mib >= 1", file=sys.stderr)
        return 2
    from fuyou.store import store as store_mod
    from fuyou.store.directio import DirectFile, aligned_empty

    root = tempfile.mkdtemp(prefix="fuyou-bench-store-", dir=a.dir)
    try:
        store, lay, data = make_store(os.path.join(root, "s"), a.mib * (1 << 20) // 4)
        nbytes = lay.nbytes
        out = aligned_empty(lay.file_bytes)
        path = store.file_path("blk", "master", 0)
        version = [0]

        def write_pipelined():
            version[0] += 1
            store.write("blk", "master", data, version=version[0])
            os.unlink(store.file_path("blk", "master", version[0]))

        # Every write creates a new file and removes it afterwards, as the store's versioned writes do.
        def write_serial():  # checksum first, then the write
            store._sum(data, nbytes, 0)
            with DirectFile(path + ".serial", "w", store.backend) as f:
                f.pwrite(data, size=nbytes).get()
                f.fsync()
            os.unlink(path + ".serial")

        def write_raw():
            with DirectFile(path + ".raw", "w", store.backend) as f:
                f.pwrite(data, size=nbytes).get()
                f.fsync()
            os.unlink(path + ".raw")

        store.write("blk", "master", data, version=0)
        store.commit(0, {"blk": {"master": 0}})

        def read_pipelined():
            store.read("blk", "master", out)

        def read_serial():  # one whole-file read, then the checksum
            old = store_mod.READ_PIECE_BYTES
            store_mod.READ_PIECE_BYTES = 1 << 50
            try:
                store.read("blk", "master", out)
            finally:
                store_mod.READ_PIECE_BYTES = old

        def read_raw():
            with DirectFile(path, "r", store.backend) as f:
                f.pread(out, size=nbytes).get()

        methods = [("write", "raw (no checksum)", write_raw), ("write", "checksum then write", write_serial),
                   ("write", "checksum during the write", write_pipelined), ("read", "raw (no checksum)", read_raw),
                   ("read", "read then checksum", read_serial), ("read", "checksum per piece during the read", read_pipelined)]
        times = {m[:2]: [] for m in methods}
        for _ in range(a.rounds):
            for op, name, fn in methods:
                t0 = time.perf_counter()
                fn()
                times[(op, name)].append(time.perf_counter() - t0)
        rows = []
        for op in ("write", "read"):
            raw = median(times[(op, "raw (no checksum)")])
            for (o, name), ts in times.items():
                if o == op:
                    rows.append([op, name, f"{nbytes / median(ts) / 1e9:.2f}", f"{raw / median(ts):.2f}"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info = machine_info()
    text = "\n".join([
        "# bench_store: checksummed store I/O",
        "",
        f"Machine: {machine_line(info)}.",
        SHARED_NOTE,
        f"One {a.mib} MiB file, {a.rounds} round-robin rounds, medians; writes include the fsync.",
        "",
        markdown_table(["op", "method", "GB/s", "vs raw"], rows),
        "",
    ])
    write_report(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
