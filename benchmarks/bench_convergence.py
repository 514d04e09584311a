"""Loss after N steps of the default job under each codec / low-precision recipe, against fp32.

    python benchmarks/bench_convergence.py --group states   # issue: fp8/de8 moments within 1% of fp32
    python benchmarks/bench_convergence.py --group linear   # issue: fp8-blockwise within 2%; mxfp4, nvfp4 reported
    python benchmarks/bench_convergence.py --group lora     # LoRA (r 16, all-linear) on an fp8 base within 2% of a bf16 base

Every run: the llama-tiny preset (same seed, same initial weights), the bundled corpus, batch 8 x
128, 2 micro-batches, lr 1e-3, N steps (default 200). "final" is the mean loss of the last 10 steps
(one step's loss is a 8-sequence sample; the mean of 10 is what a comparison within 1% can rest on).
On a CPU-only machine the low-precision recipes run their torch reference path (quantize,
dequantize, fp32 matmul), numerically what the Triton kernels compute.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = {
    "states": [("fp32 states", {}), ("fp8 states", {"states": "fp8"}), ("de8 states", {"states": "de8"}), ("fp8 states + bf16+rem master", {"states": "fp8", "master": "bf16+rem"})],
    "linear": [("fp32 GEMMs", {}), ("fp8-blockwise", {"linear": "fp8-blockwise"}), ("mxfp4", {"linear": "mxfp4"}), ("nvfp4", {"linear": "nvfp4"})],
    "lora": [("LoRA, bf16 base", {"lora": True, "weights": "bf16"}), ("LoRA, fp8 base", {"lora": True, "weights": "fp8"})],
}


def run(name, opts, steps, root):
    from fuyou.config import FinetuneConfig, OptimConfig, PeftConfig, StateConfig
    from fuyou.lora.job import finetune_lora
    from fuyou.train import finetune

    state = StateConfig(weights=opts.get("weights", "fp32"), master=opts.get("master", "fp32"), states=opts.get("states", "fp32"))
    where = os.path.join(root, name.replace(" ", "_").replace(",", ""))
    peft = PeftConfig(method="lora", r=16, alpha=32.0, target_modules="all-linear", run_dir=where + "-run") if opts.get("lora") else PeftConfig()
    cfg = FinetuneConfig(store=where, steps=steps, state=state, optim=OptimConfig(lr=1e-3), linear=opts.get("linear"), peft=peft)
    res = (finetune_lora if opts.get("lora") else finetune)(cfg, console=_quiet())
    losses = [s.loss for s in res.steps]
    tail = losses[-10:]
    return sum(tail) / len(tail), losses[-1], sorted(s.seconds for s in res.steps)[len(res.steps) // 2]


def _quiet():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", choices=list(GROUPS), required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as root:
        for name, opts in GROUPS[args.group]:
            final, last, step_s = run(name, opts, args.steps, root)
            rows.append((name, final, last, step_s))
            print(f"{name}: final {final:.4f}", file=sys.stderr, flush=True)
    base = rows[0][1]
    lines = [
        f"Convergence, group {args.group}: llama-tiny, bundled corpus, {args.steps} steps, batch 8x128, lr 1e-3 "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()})",
        "",
        "| setting | final loss (mean of last 10) | last step | vs first row | median step (s) |",
        "|---|---|---|---|---|",
    ]
    for name, final, last, step_s in rows:
        lines.append(f"| {name} | {final:.4f} | {last:.4f} | {100 * (final - base) / base:+.2f}% | {step_s:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
