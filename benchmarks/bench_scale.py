"""Scale demonstration: fine-tune a model whose full training state is more than twice this
machine's RAM, with everything in fuyou's store and a small --cpu-mem.

    python benchmarks/bench_scale.py --dry-run                  # the plan for llama-3b; refuses if the disk is short
    python benchmarks/bench_scale.py --store /nvme/scale        # llama-3b, --cpu-mem 4GiB, 2 steps
    python benchmarks/bench_scale.py --model llama-220m --store /tmp/s   # small end-to-end check

Peak disk is up to twice the state (the store keeps the old and the new version of each block until
the step commits), so the free space at --store must be at least 2 x state plus a margin. Records
peak RSS, step times and bytes moved; the table goes to benchmarks/results/bench_scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    RESULTS_DIR,
    SHARED_NOTE,
    fmt_bytes,
    io_bytes,
    machine_info,
    machine_line,
    markdown_table,
    median,
    peak_rss_bytes,
    ram_bytes,
    run_python,
    write_report,
)

BYTES_PER_PARAM = {"fp32": 16, "bf16": 14}  # weights + fp32 master + exp_avg + exp_avg_sq
# Peak disk / state: safe mode keeps old and new versions of every block until the step commits;
# lean mode replaces each block's states as written and keeps only the old compute weights.
DISK_FACTOR = {"safe": 2.0, "lean": 1.25}
DISK_MARGIN = 0.05  # manifest, logs, filesystem slack


def count_params(model: str) -> int:
    """Parameter count of a preset (or a model directory's config), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuyou.model.source import ModelSource

    cfg = ModelSource(model).config
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


def plan(a) -> dict:
    numel = count_params(a.model)
    state = numel * BYTES_PER_PARAM[a.weights]
    probe = a.store
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if os.path.isdir(a.store):  # an old store there is replaced: its space comes back
        free += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.store) for f in fs)
    ckpt = 0 if a.model in _presets() and not a.plain else numel * CKPT_BYTES_PER_PARAM
    need = int(state * (DISK_FACTOR[a.disk_mode] + DISK_MARGIN)) + ckpt
    return {
        "model": a.model,
        "numel": numel,
        "state_bytes": state,
        "ram_bytes": ram_bytes(),
        "free_disk_bytes": free,
        "need_disk_bytes": need,
        "checkpoint_bytes": ckpt,
        "store": os.path.abspath(a.store),
    }


def describe(p: dict, a) -> str:
    ratio = p["state_bytes"] / p["ram_bytes"]
    lines = [
        f"model {p['model']}: {p['numel'] / 1e6:,.1f} M params; training state {BYTES_PER_PARAM[a.weights]} B/param ({a.weights} weights) = {fmt_bytes(p['state_bytes'])}",
        f"RAM {fmt_bytes(p['ram_bytes'])}: state is {ratio:.2f}x RAM ({'more than' if ratio > 2 else 'NOT more than'} twice RAM); fuyou --cpu-mem {a.cpu_mem}",
        f"store {p['store']}: free {fmt_bytes(p['free_disk_bytes'])}, needs {fmt_bytes(p['need_disk_bytes'])} "
        f"({a.disk_mode} disk mode: {DISK_FACTOR[a.disk_mode]:g} x state + {DISK_MARGIN:.0%}"
        + (f", plus the bf16 start checkpoint, {CKPT_BYTES_PER_PARAM} B/param, written beside the store)" if p["checkpoint_bytes"] else "; the preset is imported directly)"),
        f"run: {a.steps} steps, batch {a.batch_size} x seq {a.seq_len}, device {a.device}",
    ]
    return "\n".join(lines)


def disk_error(p: dict) -> str:
    if p["free_disk_bytes"] >= p["need_disk_bytes"]:
        return ""
    return (
        f"not enough free disk at {p['store']}: {fmt_bytes(p['free_disk_bytes'])} free, {fmt_bytes(p['need_disk_bytes'])} needed "
        f"for {p['model']}; free space there or pass --store on a larger disk (or a smaller --model)"
    )


def run(a, p: dict) -> dict:
    import fuyou.train as train
    from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, StateConfig, parse_size

    ckpt = _checkpoint(a) if a.plain or a.model not in _presets() else a.model
    cfg = train.FinetuneConfig(
        model=ckpt,
        data="builtin",  # the bundled corpus, as for a preset
        disk_mode=a.disk_mode,
        store=a.store,
        steps=a.steps,
        seed=a.seed,
        overwrite=True,
        device=a.device,
        state=StateConfig(weights=a.weights),
        optim=OptimConfig(lr=a.lr),
        batch=BatchConfig(batch_size=a.batch_size, micro_batches=1, seq_len=a.seq_len),
        # Host memory: --cpu-mem alone (no block cache), so the state really streams from the store.
        memory=MemoryConfig(cpu_mem_bytes=parse_size(a.cpu_mem), gpu_mem_bytes=parse_size(a.gpu_mem) if a.gpu_mem else None, cache_mem_bytes=0),
    )
    from scheduler import Trace

    io0, t0 = io_bytes(), time.perf_counter()
    res = train.finetune(cfg, trace=Trace())
    wall, io1 = time.perf_counter() - t0, io_bytes()
    plain = run_plain_subprocess(a, ckpt) if a.plain else None
    return {
        "steps": [
            {"loss": s.loss, "seconds": s.seconds, "read": s.bytes_read, "written": s.bytes_written, "tokens": a.batch_size * a.seq_len,
             "status": s.status, "overlap_pct": overlap_pct(s.events, s.seconds)}
            for s in res.steps
        ],
        "plain": plain,
        "import_seconds": res.import_seconds,
        "wall_seconds": wall,
        "peak_rss_bytes": max(res.peak_rss_bytes, peak_rss_bytes()),
        "pool_peaks": res.pool_peaks,
        "process_io": {"read_bytes": io1["read_bytes"] - io0["read_bytes"], "write_bytes": io1["write_bytes"] - io0["write_bytes"]},
        "numel": res.numel,
    }


CKPT_BYTES_PER_PARAM = 2  # the start checkpoint is written in bf16; fuyou keeps fp32 master weights
SHARD_BYTES = 1 << 30


def overlap_pct(events, wall_s: float) -> float:
    """Share of the non-compute lanes' busy time (reads, writes, optimizer) hidden behind compute:
    (compute + other - wall) / other, clipped to 0..100. 100% = the step costs only its compute."""
    busy = {}
    for e in events or []:
        busy[e.lane] = busy.get(e.lane, 0.0) + e.duration_s
    compute = busy.pop("compute", 0.0)
    other = sum(busy.values())
    if other <= 0:
        return 100.0
    return max(0.0, min(100.0, 100.0 * (compute + other - wall_s) / other))


def run_plain_subprocess(a, ckpt: str) -> dict:
    """The same checkpoint and rows trained in memory with plain PyTorch (own process), where it fits."""
    out = os.path.join(a.work, "plain.json")
    args = [os.path.abspath(__file__), "--worker-plain", ckpt, "--result", out, "--device", a.device, "--steps", str(a.steps)]
    args += ["--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--lr", repr(a.lr), "--seed", str(a.seed), "--out", ""]
    args += ["--weights", a.weights]
    proc = run_python(args)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {"error": (tail[-1] if tail else f"exit {proc.returncode}")[:300]}
    with open(out) as f:
        return json.load(f)


def worker_plain(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fuyou.data.dataset import TokenDataset
    from fuyou.data.tokenizer import DEFAULT_CORPUS, load_tokenizer
    from fuyou.model.skeleton import causal_lm_loss_sum, count_targets

    dev = torch.device(a.device)
    model = AutoModelForCausalLM.from_pretrained(a.worker_plain, dtype=torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else ram_bytes() // 2
    if 16 * numel > 0.9 * free:  # weights + grads + two AdamW moments, before activations
        return {"skipped": f"plain PyTorch needs > {fmt_bytes(16 * numel)} on {dev.type}, {fmt_bytes(free)} free: does not fit"}
    model = model.to(dev).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    # The same compute precision as fuyou's: bf16 compute weights there = bf16 autocast (fp32 master) here.
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.weights == "bf16" and dev.type == "cuda")
    ds = TokenDataset(DEFAULT_CORPUS, load_tokenizer(a.worker_plain), a.seq_len, seed=a.seed)
    steps = []
    for i in range(a.steps):
        b = ds.batch(i * a.batch_size, a.batch_size)
        t0 = time.perf_counter()
        ids, labels = b.input_ids.to(dev), b.labels.to(dev)
        mask = None if b.attention_mask is None else b.attention_mask.to(dev)
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits
        ls = causal_lm_loss_sum(logits, labels)
        total = count_targets(b.labels)
        (ls / total).backward()
        opt.step()
        loss = float(ls.detach()) / total
        steps.append({"loss": loss, "seconds": time.perf_counter() - t0})
    return {"steps": steps, "peak_rss_bytes": peak_rss_bytes()}


def _presets():
    from fuyou.model.source import PRESETS

    return PRESETS


def _checkpoint(a) -> str:
    """A random-init checkpoint of a preset, streamed shard by shard (never the whole model in RAM):
    fuyou reads weights from a model directory, and presets of this size carry no tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from fuyou.data.tokenizer import DEFAULT_TOKENIZER_DIR
    from fuyou.model.source import PRESETS, preset_config

    if a.model not in PRESETS:
        return a.model
    d = os.path.join(a.work, "checkpoint")
    os.makedirs(d, exist_ok=True)
    cfg = preset_config(a.model)
    cfg.save_pretrained(d)
    for f in os.listdir(DEFAULT_TOKENIZER_DIR):
        shutil.copy(os.path.join(DEFAULT_TOKENIZER_DIR, f), os.path.join(d, f))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(a.seed)
    weight_map, shard, shard_bytes, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(d, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, shard_bytes, n = {}, 0, n + 1

    for name, p in meta.named_parameters():
        if p.dim() == 1:  # RMSNorm scales start at one, as in the HF init
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, cfg.initializer_range, generator=gen).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return d


def tflops(numel: int, tokens: int, seconds: float) -> float:
    return 6.0 * numel * tokens / max(seconds, 1e-12) / 1e12


def render(a, p: dict, r: dict, info: dict) -> str:
    steps = r["steps"]
    plain = (r.get("plain") or {}).get("steps") or []
    rows = [[i + 1, f"{s['loss']:.4f}", f"{s['seconds']:.2f}", f"{s['tokens'] / s['seconds']:.1f}", f"{tflops(r['numel'], s['tokens'], s['seconds']):.3f}",
             f"{s['overlap_pct']:.0f}%", fmt_bytes(s["read"]), fmt_bytes(s["written"]), f"{(s['read'] + s['written']) / r['numel']:.1f}", s["status"],
             f"{plain[i]['loss']:.4f} / {plain[i]['seconds']:.2f}" if i < len(plain) else "-"] for i, s in enumerate(steps)]
    if r.get("plain") is None:
        plain_note = "plain PyTorch in memory: not run (pass --plain)"
    elif plain:
        ps = median(s["seconds"] for s in (plain[1:] or plain))
        fs = median(s["seconds"] for s in (steps[1:] or steps))
        plain_note = f"plain PyTorch in memory on {a.device}: median step {ps:.2f} s; fuyou {fs:.2f} s = {fs / ps:.2f}x plain (medians of steps 2..N where N > 1)"
    else:
        plain_note = "plain PyTorch in memory: " + (r["plain"].get("skipped") or "failed: " + r["plain"].get("error", "?"))
    return "\n".join([
        "# bench_scale: training state larger than RAM",
        "",
        f"Machine: {machine_line(info)}.",
        SHARED_NOTE,
        "",
        "```",
        describe(p, a),
        "```",
        "",
        markdown_table(["step", "loss", "seconds", "tokens/s", "TFLOPS", "overlap", "store read", "store written", "B/param", "status", "plain loss / s"], rows),
        "",
        "TFLOPS by the 6 x params x tokens convention (tokens = batch x seq per step). Overlap: share of the read/write/optimizer "
        "lanes' busy time hidden behind compute, from fuyou's trace of the step.",
        plain_note,
        "",
        f"Median step (steps 2..N; step 1 alone when N = 1) {median(s['seconds'] for s in (steps[1:] or steps)):.2f} s; "
        f"import of the preset into the store {r['import_seconds']:.1f} s; "
        f"peak RSS {fmt_bytes(r['peak_rss_bytes'])} ({r['peak_rss_bytes'] / p['state_bytes']:.1%} of the state); "
        f"process disk traffic over import + steps: read {fmt_bytes(r['process_io']['read_bytes'])}, written {fmt_bytes(r['process_io']['write_bytes'])}.",
        "",
    ])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3b")
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "fuyou-bench-scale"), help="store directory (replaced)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cpu-mem", default="4GiB")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--weights", choices=sorted(BYTES_PER_PARAM), default="fp32")
    ap.add_argument("--disk-mode", choices=sorted(DISK_FACTOR), default="lean", help="fuyou --disk-mode (lean: peak disk ~1.25x the state)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-store", action="store_true", help="leave the store on disk afterwards")
    ap.add_argument("--plain", action="store_true", help="also train the same checkpoint in memory with plain PyTorch (where it fits)")
    ap.add_argument("--worker-plain", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the disk; train nothing")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "bench_scale.md"))
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker_plain:
        with open(a.result, "w") as f:
            json.dump(worker_plain(a), f)
        return 0
    p = plan(a)
    print(describe(p, a))
    err = disk_error(p)
    if err:
        print(f"refusing: {err}", file=sys.stderr)
        return 2
    if a.dry_run:
        print("dry run: disk check passed; nothing trained")
        return 0
    info = machine_info()
    parent = os.path.dirname(os.path.abspath(a.store))
    os.makedirs(parent, exist_ok=True)
    a.work = tempfile.mkdtemp(prefix="fuyou-bench-scale-ckpt-", dir=parent)  # on the disk the plan checked
    try:
        r = run(a, p)
    finally:
        shutil.rmtree(a.work, ignore_errors=True)
        if not a.keep_store:
            shutil.rmtree(a.store, ignore_errors=True)
    text = render(a, p, r, info)
    write_report(text, a.out)
    if a.out:
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"machine": info, "plan": p, "result": r}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
