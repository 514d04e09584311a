"""One training step, three ways, same model and data: plain PyTorch in memory, DeepSpeed
ZeRO-Infinity (parameters and optimizer on NVMe), and fuyou (everything in its store, --cpu-mem
smaller than the training state).

    python benchmarks/bench_step.py                 # llama-220m, fp32, batch 4 x 256, 6 steps
    python benchmarks/bench_step.py --quick         # llama-tiny, 4 steps (a smoke run)

Each trainer runs in its own subprocess, so peak RSS (VmHWM) and the disk counters
(/proc/self/io read_bytes/write_bytes, measured around every step the same way for all three) are
per trainer. Step time is the median of steps 2..N (step 1 warms caches and builds buffers).
--rounds R runs the trainers R times in turn (plain, fuyou, plain, fuyou, ...): the ratio is taken
round by round, so background load that drifts between rounds hits both sides of each ratio; the
report gives every round's ratio and their median. The table goes to benchmarks/results/bench_step.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    SHARED_NOTE,
    fmt_bytes,
    io_bytes,
    machine_info,
    machine_line,
    markdown_table,
    median,
    peak_rss_bytes,
    report_path,
    run_python,
    write_report,
)

TRAINERS = ("plain", "deepspeed", "fuyou")
GOAL_RATIO = 1.15  # issue #8: fuyou <= 1.15x plain PyTorch in fp32 mode
WORKER_TIMEOUT_S = 3600


# ---------------------------------------------------------------- workers (one trainer each) ----


def _batches(ckpt: str, steps: int, batch_size: int, seq_len: int, seed: int):
    """The rows fuyou's own loop feeds: the bundled corpus, the checkpoint's tokenizer, seeded order."""
    from fuyou.data.dataset import TokenDataset
    from fuyou.data.tokenizer import DEFAULT_CORPUS, load_tokenizer

    ds = TokenDataset(DEFAULT_CORPUS, load_tokenizer(ckpt), seq_len, seed=seed)
    return [ds.batch(i * batch_size, batch_size) for i in range(steps)]


def _measured(fn):
    """Run one step `fn() -> loss`; return its record with wall time and disk bytes of this process."""
    io0, t0 = io_bytes(), time.perf_counter()
    loss = fn()
    t1, io1 = time.perf_counter(), io_bytes()
    return {
        "loss": float(loss),
        "seconds": t1 - t0,
        "io_read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "io_write_bytes": io1["write_bytes"] - io0["write_bytes"],
        "rss_peak_bytes": peak_rss_bytes(),
    }


def worker_checkpoint(a) -> dict:
    """A random-init checkpoint of the preset (seeded) with the bundled tokenizer: the one start point."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuyou.data.tokenizer import DEFAULT_TOKENIZER_DIR
    from fuyou.model.source import preset_config

    cfg = preset_config(a.model)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(a.ckpt)
    for f in os.listdir(DEFAULT_TOKENIZER_DIR):
        shutil.copy(os.path.join(DEFAULT_TOKENIZER_DIR, f), os.path.join(a.ckpt, f))
    return {"numel": sum(p.numel() for p in model.parameters())}


def worker_plain(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from fuyou.model.skeleton import causal_lm_loss_sum, count_targets

    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    steps = []
    for batch in _batches(a.ckpt, a.steps, a.batch_size, a.seq_len, a.seed):

        def one(batch=batch):
            total = count_targets(batch.labels)
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for mb in batch.split(a.micro_batches):
                ls = causal_lm_loss_sum(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb.labels)
                (ls / total).backward()
                loss += float(ls.detach())
            opt.step()
            return loss / total

        steps.append(_measured(one))
    return {"numel": sum(p.numel() for p in model.parameters()), "steps": steps}


def worker_fuyou(a) -> dict:
    import fuyou.train as train
    from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, StateConfig, parse_size
    from scheduler import Trace

    records: List[dict] = []

    class MeasuredRuntime(train.Runtime):
        """The runtime finetune() builds, with the same per-step disk meter as the other trainers."""

        def step(self, batch, train_meta=None):
            box = {}

            def one():
                box["res"] = super(MeasuredRuntime, self).step(batch, train_meta=train_meta)
                return box["res"].loss

            rec = _measured(one)
            res = box["res"]
            rec.update(step_seconds=res.seconds, store_read_bytes=res.bytes_read, store_written_bytes=res.bytes_written, status=res.status,
                       host_copied_bytes=getattr(res, "bytes_copied", 0))
            rec["lanes"], rec["kinds"] = _trace_breakdown(res.events)
            records.append(rec)
            return res

    train.Runtime = MeasuredRuntime
    cfg = train.FinetuneConfig(
        model=a.ckpt,
        data="builtin",  # the bundled corpus, as for a preset
        store=os.path.join(a.scratch, "fuyou-store"),
        steps=a.steps,
        seed=a.seed,
        overwrite=True,
        device="cpu",
        trace_dir=a.trace_dir,
        state=StateConfig(weights="fp32"),
        optim=OptimConfig(lr=a.lr),
        batch=BatchConfig(batch_size=a.batch_size, micro_batches=a.micro_batches, seq_len=a.seq_len),
        memory=MemoryConfig(cpu_mem_bytes=parse_size(a.cpu_mem), cache_mem_bytes=0),  # host memory: --cpu-mem alone, as the peers get
    )
    res = train.finetune(cfg, trace=Trace())
    return {"numel": res.numel, "steps": records, "pool_peaks": res.pool_peaks, "import_seconds": res.import_seconds, "peak_rss_bytes_fuyou": res.peak_rss_bytes}


def _trace_breakdown(events) -> tuple:
    """Busy seconds per lane and per task kind of one step's trace events."""
    lanes: Dict[str, float] = {}
    kinds: Dict[str, float] = {}
    for e in events or []:
        lanes[e.lane] = lanes.get(e.lane, 0.0) + e.duration_s
        kinds[e.kind] = kinds.get(e.kind, 0.0) + e.duration_s
    return lanes, kinds


def _ds_config(a, nvme: str, largest_numel: int) -> dict:
    """ZeRO-Infinity as it trains on this machine (docs/benchmarks.md says why each knob is set)."""
    micro = a.batch_size // a.micro_batches
    return {
        "train_batch_size": a.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": a.micro_batches,
        "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            # max_in_cpu 0: otherwise a model under 1B params simply stays in RAM.
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 5, "buffer_size": largest_numel, "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": False},
            # Both 0: otherwise "Not enough swap in buffers" on this model.
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _patch_duplicate_swap_in() -> None:
    """ZeRO-3's parameter fetch can list the same parameter twice in one swap-in, which trips
    "already assigned swap buffer": swap each parameter once (a run-time patch of the peer, in this
    process only)."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper

    orig = AsyncPartitionedParameterSwapper.swap_in
    if getattr(orig, "_fuyou_dedup", False):
        return

    def swap_in(self, params, async_op=True, swap_in_buffers=None):
        if swap_in_buffers is None:
            seen, unique = set(), []
            for p in params:
                if p.ds_id not in seen:
                    seen.add(p.ds_id)
                    unique.append(p)
            params = unique
        return orig(self, params, async_op=async_op, swap_in_buffers=swap_in_buffers)

    swap_in._fuyou_dedup = True
    AsyncPartitionedParameterSwapper.swap_in = swap_in


def worker_deepspeed(a) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from fuyou.model.skeleton import causal_lm_loss_sum, count_targets

    _patch_duplicate_swap_in()
    deepspeed.init_distributed(dist_backend="gloo")
    nvme = os.path.join(a.scratch, "deepspeed-nvme")
    os.makedirs(nvme, exist_ok=True)
    hf = AutoConfig.from_pretrained(a.ckpt)
    ds_cfg = _ds_config(a, nvme, hf.vocab_size * hf.hidden_size)
    # zero.Init swaps torch.Tensor.__new__ while it is open; torch._dynamo refuses to import under
    # that patch, and transformers imports it lazily with the model class: import them first.
    import torch._dynamo  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401

    AutoModelForCausalLM._model_mapping[type(hf)]  # resolves (imports) the model class now
    # Built under zero.Init: otherwise the fp32 weights are silently cast to bf16 on this CPU. No
    # dtype= here: zero.Init reads it from the config (neither fp16 nor bf16: fp32), while an explicit
    # dtype is replaced by bf16 on an accelerator without fp16 (operator precedence in _set_dtype).
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, remote_device="nvme", pin_memory=False):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    state = {}
    for f in sorted(os.listdir(a.ckpt)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(a.ckpt, f)))
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(state[name])
    del state
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    # The swapper names its folder after the dtype it keeps the parameters in ("float32params").
    kept = {d for _, ds, _ in os.walk(nvme) for d in ds if d.endswith("params")} | {str(p.dtype) for p in model.parameters()}
    if not kept <= {"float32params", "torch.float32"}:
        raise RuntimeError(f"ZeRO-Infinity keeps the parameters as {sorted(kept)}, not fp32: the comparison would not be like for like")
    engine.eval()  # no dropout in Llama; matches the plain reference
    steps = []
    for batch in _batches(a.ckpt, a.steps, a.batch_size, a.seq_len, a.seed):

        def one(batch=batch):
            total = count_targets(batch.labels)
            loss = 0.0
            for mb in batch.split(a.micro_batches):
                ls = causal_lm_loss_sum(engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, mb.labels)
                # The loss is already divided by the step's target count: no extra 1/accumulation.
                engine.backward(ls / total, scale_wrt_gas=False)
                engine.step()
                loss += float(ls.detach())
            return loss / total

        steps.append(_measured(one))
    return {"numel": sum(p.ds_numel for p in model.parameters()), "steps": steps}


WORKERS = {"checkpoint": worker_checkpoint, "plain": worker_plain, "fuyou": worker_fuyou, "deepspeed": worker_deepspeed}


# ---------------------------------------------------------------------------- orchestration ----


def _worker_args(a, name: str, out: str) -> List[str]:
    args = [os.path.abspath(__file__), "--worker", name, "--result", out, "--model", a.model, "--ckpt", a.ckpt, "--scratch", a.scratch]
    args += ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--micro-batches", str(a.micro_batches)]
    args += ["--lr", repr(a.lr), "--seed", str(a.seed), "--cpu-mem", a.cpu_mem]
    if a.trace_dir:
        args += ["--trace-dir", a.trace_dir]
    return args


def run_worker(a, name: str) -> dict:
    out = os.path.join(a.scratch, f"{name}.json")
    t0 = time.perf_counter()
    try:
        proc = run_python(_worker_args(a, name, out), timeout=WORKER_TIMEOUT_S)
    except Exception as exc:  # a hung peer must not take the others down
        return {"error": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        why = next((ln for ln in reversed(tail) if ln.strip() and not ln.startswith(" ")), "no output")
        log = os.path.join(a.scratch, f"{name}.log")
        with open(log, "w") as f:
            f.write(proc.stdout + "\n" + proc.stderr)
        return {"error": f"exit {proc.returncode}: {why[:300]}", "log": log, "log_tail": "\n".join(tail[-40:])}
    with open(out) as f:
        res = json.load(f)
    res["wall_seconds"] = wall
    return res


def summarize(name: str, res: dict, numel: int) -> dict:
    """Medians over steps 2..N (all steps when there is only one)."""
    steps = res["steps"]
    tail = steps[1:] if len(steps) > 1 else steps
    row = {
        "trainer": name,
        "step_s": median(s["seconds"] for s in tail),
        "io_read_per_param": median(s["io_read_bytes"] for s in tail) / numel,
        "io_write_per_param": median(s["io_write_bytes"] for s in tail) / numel,
        "peak_rss_bytes": max(s["rss_peak_bytes"] for s in steps),
        "losses": [s["loss"] for s in steps],
    }
    if "store_read_bytes" in steps[0]:
        row["store_read_per_param"] = median(s["store_read_bytes"] for s in tail) / numel
        row["store_write_per_param"] = median(s["store_written_bytes"] for s in tail) / numel
        row["copied_per_param"] = median(s.get("host_copied_bytes", 0) for s in tail) / numel
    return row


LABELS = {"plain": "plain PyTorch (in memory)", "deepspeed": "DeepSpeed ZeRO-Infinity (NVMe)", "fuyou": "fuyou (store)"}


def render(a, info: dict, results: Dict[str, dict], ratios: Optional[List[float]] = None) -> str:
    numel = next((r["numel"] for r in results.values() if "numel" in r), 0)
    rows = {n: summarize(n, r, numel) for n, r in results.items() if "steps" in r and r["steps"]}
    base = rows.get("plain", {}).get("step_s")
    table = []
    for name in a.trainers:
        r = rows.get(name)
        if r is None:
            table.append([LABELS[name], "failed: " + results.get(name, {}).get("error", "not run"), "", "", "", "", ""])
            continue
        store = (f"{r['store_read_per_param']:.1f} / {r['store_write_per_param']:.1f} (copied {r['copied_per_param']:.1f})"
                 if "store_read_per_param" in r else "-")
        dloss = "-" if "plain" not in rows or name == "plain" else f"{max(abs(x - y) for x, y in zip(r['losses'], rows['plain']['losses'])):.2e}"
        table.append(
            [LABELS[name], f"{r['step_s']:.2f}", f"{r['step_s'] / base:.2f}x" if base else "n/a",
             f"{r['io_read_per_param']:.1f} / {r['io_write_per_param']:.1f} ({r['io_read_per_param'] + r['io_write_per_param']:.1f})",
             store, fmt_bytes(r["peak_rss_bytes"]), dloss]
        )
    state_bytes = 16 * numel
    out = [
        "# bench_step: one training step, three ways",
        "",
        f"Machine: {machine_line(info)}.",
        SHARED_NOTE,
        "The three trainers run one after another, each under whatever background load the machine had then: "
        "a ratio from one run can be off by tens of percent; compare several runs.",
        "",
        f"Model: {a.model} ({numel / 1e6:.1f} M params, random init seed {a.seed}, fp32), batch {a.batch_size} x seq {a.seq_len}, "
        f"{a.micro_batches} micro-batch(es), AdamW lr {a.lr:g}, {a.steps} steps on the bundled corpus (same rows for all). "
        f"Training state 16 B/param = {fmt_bytes(state_bytes)}; fuyou --cpu-mem {a.cpu_mem}. Step time: median of steps 2..{a.steps}. "
        "Disk B/param/step: /proc/self/io read_bytes / write_bytes of the trainer's process around each step (median); "
        "fuyou's own store counters beside them, and the bytes it copies in host memory (block cache reads and keeps: "
        "0 with the cache off). Loss diff: max |loss - plain loss| over the steps.",
        "",
        markdown_table(["trainer", "step s", "vs plain", "disk read / write B/param (sum)", "store read / write B/param", "peak RSS", "loss diff"], table),
        "",
        "Per-step losses:",
        "",
        markdown_table(["step"] + [n for n in a.trainers if n in rows], [[i + 1] + [f"{rows[n]['losses'][i]:.6f}" for n in a.trainers if n in rows] for i in range(a.steps)]),
        "",
        "Per-step seconds:",
        "",
        markdown_table(["step"] + [n for n in a.trainers if n in rows], [[i + 1] + [f"{results[n]['steps'][i]['seconds']:.2f}" for n in a.trainers if n in rows] for i in range(a.steps)]),
    ]
    out += _goal_lines(rows, results, ratios)
    return "\n".join(out) + "\n"


def round_ratios(rounds: List[Dict[str, dict]]) -> List[float]:
    """fuyou's median step over plain's, round by round (rounds where both ran)."""
    out = []
    for res in rounds:
        if all("steps" in res.get(n, {}) and res[n]["steps"] for n in ("fuyou", "plain")):
            f, p = (median(s["seconds"] for s in res[n]["steps"][1:] or res[n]["steps"]) for n in ("fuyou", "plain"))
            out.append(f / p)
    return out


def _goal_lines(rows: Dict[str, dict], results: Dict[str, dict], ratios: Optional[List[float]] = None) -> List[str]:
    if "fuyou" not in rows or "plain" not in rows:
        return []
    f, p = rows["fuyou"], rows["plain"]
    r = median(ratios) if ratios else f["step_s"] / p["step_s"]
    each = f" (median of {len(ratios)} interleaved rounds: {', '.join(f'{x:.3f}' for x in ratios)})" if ratios and len(ratios) > 1 else ""
    lines = ["", f"Goal (issue #8): fuyou <= {GOAL_RATIO}x plain in fp32: measured {r:.3f}x{each} ({'met' if r <= GOAL_RATIO else 'NOT met'})."]
    if "deepspeed" in rows:
        d = rows["deepspeed"]
        fb, db = f["io_read_per_param"] + f["io_write_per_param"], d["io_read_per_param"] + d["io_write_per_param"]
        lines.append(f"Goal: fewer disk bytes than ZeRO-Infinity: fuyou {fb:.1f} vs DeepSpeed {db:.1f} B/param/step ({'met' if fb < db else 'NOT met'}).")
    steps = results["fuyou"]["steps"]
    tail = steps[1:] if len(steps) > 1 else steps
    med = sorted(tail, key=lambda s: s["seconds"])[len(tail) // 2]
    lines += ["", f"Where fuyou's time goes (trace of its median step, {med['seconds']:.2f} s wall): busy seconds per lane "
              "(lanes run concurrently; a lane near the wall time is the bottleneck; task kinds shown where they differ from lanes):", ""]
    lines.append(markdown_table(["lane", "busy s", "% of step"], [[k, f"{v:.2f}", f"{100 * v / med['seconds']:.0f}%"] for k, v in sorted(med["lanes"].items(), key=lambda kv: -kv[1])]))
    if med["kinds"] != med["lanes"]:
        lines.append("")
        lines.append(markdown_table(["task kind", "busy s", "% of step"], [[k, f"{v:.2f}", f"{100 * v / med['seconds']:.0f}%"] for k, v in sorted(med["kinds"].items(), key=lambda kv: -kv[1])]))
    compute = med["lanes"].get("compute", 0.0)
    lines += ["", f"Compute is busy {compute:.2f} s of the {med['seconds']:.2f} s step; the other {med['seconds'] - compute:.2f} s are "
              "the part of reads, writes and optimizer work not hidden behind compute (plus scheduling gaps)."]
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-220m", help="a preset of fuyou.model.source (random init)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-mem", default="1GiB", help="fuyou's host budget (smaller than the 16 B/param state)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma list of " + ", ".join(TRAINERS))
    p.add_argument("--rounds", type=int, default=1, help="run the trainers this many times in turn; ratios round by round (the tables show the median round)")
    p.add_argument("--scratch", default=None, help="scratch directory on the disk under test (default: a temp dir, removed after)")
    p.add_argument("--trace-dir", default=None, help="also save fuyou's Chrome trace here")
    p.add_argument("--out", default=None, help="report file, plus its .json (default: benchmarks/results/bench_step.md; a --quick run only prints)")
    p.add_argument("--quick", action="store_true", help="llama-tiny, 4 steps, batch 2 x 64: a smoke run")
    p.add_argument("--from-json", default=None, help="re-render the table of a saved run (its .json) instead of running")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.steps, a.batch_size, a.seq_len, a.cpu_mem = "llama-tiny", 4, 2, 64, "64MiB"
    if not a.worker:
        a.out = report_path(a.out, a.quick, "bench_step.md")
    if a.steps < 2:
        p.error("--steps must be >= 2 (step 1 is a warm-up, excluded from the median)")
    if a.batch_size % a.micro_batches:
        p.error("--batch-size must be divisible by --micro-batches")
    if not a.worker:
        a.trainers = [t.strip() for t in a.trainers.split(",") if t.strip()]
        bad = [t for t in a.trainers if t not in TRAINERS]
        if bad:
            p.error(f"unknown trainer(s) {bad}; choose from {', '.join(TRAINERS)}")
    return a


def run_round(a) -> Dict[str, dict]:
    """Every trainer once, in turn."""
    results = {}
    for name in a.trainers:
        print(f"[bench_step] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(a, name)
        if "error" in results[name]:
            print(f"[bench_step] {name} failed: {results[name]['error']}\n{results[name].get('log_tail', '')}", file=sys.stderr)
        shutil.rmtree(os.path.join(a.scratch, f"{name}-nvme"), ignore_errors=True)
        shutil.rmtree(os.path.join(a.scratch, "fuyou-store"), ignore_errors=True)
    return results


def _median_round(rounds: List[Dict[str, dict]], ratios: List[float]) -> Dict[str, dict]:
    """The round whose ratio is the median one (the first round when no ratio was measured)."""
    if not ratios or len(ratios) != len(rounds):
        return rounds[0]
    order = sorted(range(len(rounds)), key=lambda i: ratios[i])
    return rounds[order[len(order) // 2]]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        res = WORKERS[a.worker](a)
        with open(a.result, "w") as f:
            json.dump(res, f)
        return 0
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        for k in ("model", "steps", "batch_size", "seq_len", "micro_batches", "lr", "seed", "cpu_mem", "trainers"):
            setattr(a, k, saved["args"][k])
        rounds = saved.get("rounds", [saved["results"]])
        write_report(render(a, saved["machine"], saved["results"], round_ratios(rounds)), a.out)
        return 0
    own_scratch = a.scratch is None
    a.scratch = os.path.abspath(a.scratch or tempfile.mkdtemp(prefix="fuyou-bench-step-", dir=os.environ.get("FUYOU_BENCH_DIR")))
    os.makedirs(a.scratch, exist_ok=True)
    a.ckpt = os.path.join(a.scratch, "checkpoint")
    info = machine_info()
    try:
        ck = run_worker(a, "checkpoint")
        if "error" in ck:
            print(f"cannot build the start checkpoint: {ck['error']}", file=sys.stderr)
            return 1
        rounds = [run_round(a) for _ in range(a.rounds)]
        ratios = round_ratios(rounds)
        results = _median_round(rounds, ratios)
        text = render(a, info, results, ratios)
    finally:
        if own_scratch:
            shutil.rmtree(a.scratch, ignore_errors=True)
    write_report(text, a.out)
    if a.out:
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"machine": info, "args": {k: v for k, v in vars(a).items() if k not in ("worker", "result")}, "results": results,
                       "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
