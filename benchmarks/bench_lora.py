"""LoRA step time, fuyou against plain PyTorch + peft, same model, data and adapters, same machine:
plain holds the whole model in memory; fuyou streams the frozen base from its store (block cache on
and off) and trains the adapters beside it.

    python benchmarks/bench_lora.py             # llama-220m, fp32 base, batch 4 x 256, r 16 all-linear, 6 steps
    python benchmarks/bench_lora.py --quick     # llama-tiny, 4 steps (a smoke run)

Step time is the median of steps 2..N. The table goes to benchmarks/results/bench_lora.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import SHARED_NOTE, machine_line, markdown_table, median, report_path, write_report  # noqa: E402


def _plain(ckpt: str, batches, micro: int, a) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from fuyou.model.skeleton import causal_lm_loss_sum, count_targets

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules="all-linear", lora_dropout=0.0)).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for batch in batches:
        t0, total, loss = time.perf_counter(), count_targets(batch.labels), 0.0
        opt.zero_grad()
        for mb in batch.split(micro):
            ls = causal_lm_loss_sum(model(input_ids=mb.input_ids, use_cache=False).logits, mb.labels)
            (ls / total).backward()
            loss += float(ls.detach())
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss / total)
    return {"step_s": median(times[1:]), "loss": losses[-1], "bytes": 0}


def _fuyou(ckpt: str, data: str, work: str, a, cache: str) -> dict:
    from fuyou.config import BatchConfig, FinetuneConfig, MemoryConfig, OptimConfig, PeftConfig, parse_size
    from fuyou.lora.job import finetune_lora

    cfg = FinetuneConfig(model=ckpt, data=data, store=os.path.join(work, "base"), steps=a.steps, device="cpu", overwrite=False,
                         optim=OptimConfig(lr=1e-4), batch=BatchConfig(batch_size=a.batch_size, micro_batches=a.micro_batches, seq_len=a.seq_len),
                         memory=MemoryConfig(cache_mem_bytes=parse_size(cache) if cache != "auto" else None),
                         peft=PeftConfig(method="lora", r=a.r, alpha=2.0 * a.r, target_modules="all-linear", run_dir=os.path.join(work, f"run-{cache}")))
    res = finetune_lora(cfg)
    steps = res.steps[1:]
    return {"step_s": median([s.seconds for s in steps]), "loss": res.steps[-1].loss, "bytes": median([s.bytes_read for s in steps]),
            "numel": res.numel}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="llama-tiny, 4 steps")
    ap.add_argument("--model", default="llama-220m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.steps, a.seq_len = "llama-tiny", 4, 64
    from benchmarks.bench_scale import _checkpoint
    from fuyou.data.dataset import TokenDataset
    from fuyou.data.tokenizer import DEFAULT_CORPUS, load_tokenizer

    work = tempfile.mkdtemp(prefix="fuyou-bench-lora-")
    try:
        a.work, a.seed = work, 0
        ckpt = _checkpoint(a)
        ds = TokenDataset(DEFAULT_CORPUS, load_tokenizer(ckpt), a.seq_len, seed=0)
        batches = [ds.batch(i * a.batch_size, a.batch_size) for i in range(a.steps)]
        rows, plain = [], _plain(ckpt, batches, a.micro_batches, a)
        for cache in ("0", "auto"):
            f = _fuyou(ckpt, DEFAULT_CORPUS, work, a, cache)
            rows.append([f"fuyou, block cache {'off' if cache == '0' else 'on'}", f"{f['step_s']:.3f}", f"{f['step_s'] / plain['step_s']:.2f}x",
                         f"{f['bytes'] / f['numel']:.2f}", f"{f['loss']:.4f}"])
        rows.insert(0, ["plain PyTorch + peft (in memory)", f"{plain['step_s']:.3f}", "1.00x", "0", f"{plain['loss']:.4f}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        f"# LoRA step time: {a.model}, fp32 base, batch {a.batch_size} x {a.seq_len} in {a.micro_batches} micro-batches, r {a.r} all-linear",
        "", f"Machine: {machine_line()}.", SHARED_NOTE, "",
        markdown_table(["trainer", "median step (s)", "vs plain", "store B/param/step read", f"loss at step {a.steps}"], rows),
    ])
    write_report(text, report_path(a.out, a.quick, "bench_lora.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
