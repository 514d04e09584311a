"""`python -m benchmarks`: every benchmark that fits this machine, in its quick mode, and a summary
in benchmarks/results/summary.md (machine, date, each benchmark's table, SSD bytes per parameter).

    python -m benchmarks              # all quick runs (minutes on the 2-core dev box)
    python -m benchmarks --only ssd   # just the SSD-bytes table (seconds)

Each script runs in its own subprocess. Scripts by other parts of the project (bench_io.py,
bench_adam.py, bench_gemm.py, ...) are run with --quick when their --help offers it, and skipped
with a note otherwise (or when absent).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, SHARED_NOTE, machine_info, machine_line, markdown_table, run_python, write_report  # noqa: E402

BENCH_DIR = os.path.join(REPO_ROOT, "benchmarks")
OTHER_SCRIPTS = ("bench_io.py", "bench_store.py", "bench_adam.py", "bench_gemm.py", "bench_predict.py", "bench_lora.py")
SCRIPT_TIMEOUT_S = 1800
# Reference points (B/param/step on SSD): the Fuyou paper's design moves 16 read + 14 written;
# ZeRO-Infinity also spills the gradients to the SSD and reads them back, 8 more.
FUYOU_PAPER_B, ZERO_INFINITY_B = 30, 38


def run_script(name: str, args: List[str]) -> Tuple[str, str]:
    """(status line, printed output) of `python benchmarks/<name> args`."""
    t0 = time.perf_counter()
    try:
        proc = run_python([os.path.join(BENCH_DIR, name), *args], timeout=SCRIPT_TIMEOUT_S)
    except Exception as exc:  # a hung script is reported, the others still run
        return f"failed: {type(exc).__name__}", ""
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return f"failed (exit {proc.returncode}, {dt:.0f} s): {tail[-1][:200] if tail else ''}", proc.stdout
    return f"ran in {dt:.0f} s", proc.stdout


def supports_quick(name: str) -> bool:
    try:
        proc = run_python([os.path.join(BENCH_DIR, name), "--help"], timeout=120)
    except Exception:
        return False
    return proc.returncode == 0 and "--quick" in proc.stdout


def ssd_bytes_table() -> str:
    """SSD bytes per parameter per step for each codec setting StateConfig accepts: the store traffic
    of llama-220m's step graph (the one the runtime runs: prefetch depth 0, one optimizer slot, no
    block cache), counted by fuyou.step.graph.bytes_per_step. Nothing is written."""
    import fuyou.config as cf
    from fuyou.optim.state import SMALL_NUMEL
    from fuyou.planning.search import candidate, load_model_config, model_shape
    from fuyou.planning.settings import PlanConfig
    from fuyou.step.graph import bytes_per_step

    hf_config = load_model_config("llama-220m")
    nominal = {  # the arithmetic, per parameter
        ("fp32", "fp32", "fp32"): "weights read twice 2x4 + master/m/v read 12 = 20; master/m/v/weights written 4x4 = 16; 36",
        ("bf16", "fp32", "fp32"): "weights read twice 2x2 + master/m/v read 12 = 16; master/m/v written 12 + weights 2 = 14; 30",
    }
    rows, numel = [], 0
    for w, m, s in [(w, m, s) for w in cf.WEIGHT_CODECS for m in cf.MASTER_CODECS for s in cf.MOMENT_CODECS]:
        cfg = PlanConfig(model="llama-220m", state=cf.StateConfig(weights=w, master=m, states=s))
        shape = model_shape(hf_config, cfg.state)
        numel = shape.numel
        b = bytes_per_step(candidate(shape, cfg, cfg.batch.micro_batches, 0, 1).build().tasks)
        r, wr = b["ssd read"] / numel, b["ssd written"] / numel
        rows.append([f"weights {w}, master {m}, states {s}", f"{r:.2f}", f"{wr:.2f}", f"{r + wr:.2f}", nominal.get((w, m, s), "from the store layout")])
    rows.append(["Fuyou paper design", "16", "14", str(FUYOU_PAPER_B), "weights/states as in the paper"])
    rows.append(["ZeRO-Infinity (design accounting)", "", "", str(ZERO_INFINITY_B), "Fuyou's 30 + 8 of gradient spill"])
    return "\n".join([
        f"SSD bytes per parameter per step (llama-220m, {numel / 1e6:.1f} M params), counted on the step graph the runtime runs: "
        f"the head's forward and backward share one read of its weights, so reads sit below the nominal 'weights read twice'; "
        f"tensors under {SMALL_NUMEL} elements keep fp32 state:",
        "",
        markdown_table(["codec setting", "read B/param", "written B/param", "total", "arithmetic"], rows),
    ])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ssd", "step", "scale", "others"], action="append", help="run just these parts (repeatable)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "summary.md"))
    a = ap.parse_args(argv)
    parts = a.only or ["ssd", "step", "scale", "others"]
    info = machine_info()
    sections = ["# fuyou benchmarks: summary", "", f"Machine: {machine_line(info)}.", SHARED_NOTE, ""]
    status = []
    if "ssd" in parts:
        sections += ["## SSD traffic per step", "", ssd_bytes_table(), ""]
        status.append(["ssd bytes table", "computed"])
    with tempfile.TemporaryDirectory(prefix="fuyou-bench-") as tmp:
        if "step" in parts:
            st, out = run_script("bench_step.py", ["--quick", "--out", os.path.join(tmp, "step.md")])
            status.append(["bench_step.py --quick", st])
            sections += ["## bench_step --quick (llama-tiny; the full run: python benchmarks/bench_step.py)", "", _demote(out) or st, ""]
        if "scale" in parts:
            st1, plan = run_script("bench_scale.py", ["--dry-run"])
            if "exit 2" in st1:  # the plan ran and refused: not enough disk for the demo here
                st1 = "plan printed; " + st1.split(": ", 1)[-1]
            st2, out = run_script("bench_scale.py", ["--model", "llama-tiny", "--steps", "2", "--plain", "--store", os.path.join(tmp, "scale-store"), "--out", ""])
            status += [["bench_scale.py --dry-run (llama-3b plan)", st1], ["bench_scale.py --model llama-tiny --plain", st2]]
            out = out[out.find("# bench_scale"):] if "# bench_scale" in out else out  # the table repeats the plan lines
            sections += ["## bench_scale", "", "Plan of the llama-3b demonstration on this machine:", "", "```", plan.strip(), "```", "",
                         "Quick end-to-end run (llama-tiny):", "", _demote(out) or st2, ""]
        if "others" in parts:
            for name in OTHER_SCRIPTS:
                if not os.path.exists(os.path.join(BENCH_DIR, name)):
                    status.append([name, "skipped: not in this tree"])
                    continue
                if not supports_quick(name):
                    status.append([name, "skipped: no --quick mode (run it by hand)"])
                    continue
                st, out = run_script(name, ["--quick"])
                status.append([f"{name} --quick", st])
                sections += [f"## {name} --quick", "", _demote(out) or st, ""]
    sections[5:5] = ["## Runs", "", markdown_table(["benchmark", "status"], status), ""]
    text = "\n".join(sections) + "\n"
    write_report(text, a.out)
    return 0


def _demote(text: str) -> str:
    """Sub-benchmark headings one level down, so the summary keeps one top heading."""
    return "\n".join("#" + ln if ln.startswith("#") else ln for ln in (text or "").strip().splitlines())


if __name__ == "__main__":
    sys.exit(main())
