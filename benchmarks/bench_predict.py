"""Predicted vs measured step time on this machine, for three configurations.

For each configuration: probe the rates (storage through DirectFile, the optimizer body, and the
compute rate of a decoder layer of the configuration's own shape), plan the run with fuyou.planning.search
(the very graph the runtime will execute), run it, and compare the prediction with the median step
of steps 2..N. Prints the machine, the rates and a table; numbers are medians (the machine is shared
and noisy: see docs/planner.md).

    /work/venv/bin/python benchmarks/bench_predict.py [--steps 5] [--dir /tmp/fuyou-bench]
    /work/venv/bin/python benchmarks/bench_predict.py --quick   # one configuration, a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, StateConfig  # noqa: E402
from fuyou.planning.settings import PlanConfig  # noqa: E402
from fuyou.data.dataset import Batch  # noqa: E402
from fuyou.model.importer import import_model  # noqa: E402
from fuyou.model.skeleton import Skeleton  # noqa: E402
from fuyou.model.source import ModelSource, preset_config  # noqa: E402
from fuyou.planning.search import candidate, model_shape  # noqa: E402
from fuyou.planning.probe import probe_rates  # noqa: E402
from fuyou.planning.rates import machine_info  # noqa: E402
from fuyou.planning.profile import profile_step  # noqa: E402
from fuyou.step.runtime import Runtime  # noqa: E402
from scheduler import Trace  # noqa: E402
from scheduler.costmodel import Rates, fit_rates, predict  # noqa: E402


def hidden512_config():
    cfg = preset_config("llama-tiny", 4096)
    for k, v in dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8).items():
        setattr(cfg, k, v)
    return cfg


CONFIGS = [
    # name, model config, batch, memory (None budget = the runtime's default), why
    ("llama-tiny default", lambda: preset_config("llama-tiny", 4096), BatchConfig(batch_size=8, micro_batches=2, seq_len=128), MemoryConfig()),
    ("12 x 512, --cpu-mem minimum", hidden512_config, BatchConfig(batch_size=4, micro_batches=2, seq_len=128), "minimum"),
    ("llama-tiny, prefetch depth 0", lambda: preset_config("llama-tiny", 4096), BatchConfig(batch_size=8, micro_batches=2, seq_len=128), MemoryConfig(prefetch_depth=0)),
]


def bracket(a: Rates, b: Rates) -> Rates:
    """Rates whose time per unit is the mean of a's and b's."""
    rate = lambda v, w: 2 / (1 / v + 1 / w)  # noqa: E731 - the rate of the mean time per unit
    d = {}
    for k, v in a.to_json().items():
        w = b.to_json()[k]
        if k == "latency_s":
            d[k] = {x: (v.get(x, 0) + w.get(x, 0)) / 2 for x in set(v) | set(w)}
        elif k == "optim_by_codec":  # rates per codec, each probed both times
            d[k] = {x: rate(v[x], w[x]) for x in set(v) & set(w)}
        elif k in ("compute_call_s", "commit_file_s"):
            d[k] = (v + w) / 2
        else:
            d[k] = rate(v, w)
    return Rates.from_json(d)


def run_config(name, make_cfg, batch, memory, root, steps, file_bytes, loaded):
    hf = make_cfg()
    src = ModelSource("llama-tiny")
    src.config = hf  # a preset-like model built in code: random init, no checkpoint files
    state = StateConfig()
    shape = model_shape(hf, state)
    # The configurations measure the streaming pipeline: no block cache (planner and run alike).
    if memory != "minimum":
        memory = dataclasses.replace(memory, cache_mem_bytes=0)
    if memory == "minimum":
        c0 = candidate(shape, PlanConfig(batch=batch, device="cpu"), batch.micro_batches, 0, 1)
        memory = c0.extra["run"]["memory"]
    store_dir = os.path.join(root, "store")
    shutil.rmtree(store_dir, ignore_errors=True)
    store = import_model(src, store_dir, state)
    layer_numel = shape.store.layouts[shape.store.block_names[1]].numel
    layer = dict(hidden=hf.hidden_size, intermediate=hf.intermediate_size, heads=hf.num_attention_heads, kv_heads=hf.num_key_value_heads,
                 batch=batch.micro_batch_size, seq_len=batch.seq_len)
    # Probed in the same run, at this configuration's layer shape and block size, with the other
    # lanes busy (probe_rates(loaded=True)).
    # Probed just before and just after the run (the machine's load drifts by the minute); the two
    # are combined by averaging each rate's time per unit.
    before, _ = probe_rates(torch.device("cpu"), root, file_bytes=file_bytes, layer=layer, optim_numel=layer_numel, loaded=loaded)
    trace = Trace()
    rt = Runtime(store, Skeleton(hf), device=torch.device("cpu"), memory=memory, batch=batch, optim=OptimConfig(lr=1e-4), trace=trace)
    g = torch.Generator().manual_seed(0)
    try:
        results = []
        for _ in range(steps):
            ids = torch.randint(0, hf.vocab_size, (batch.batch_size, batch.seq_len), generator=g)
            results.append(rt.step(Batch(ids, ids.clone(), None)))
    finally:
        rt.close()
    after, _ = probe_rates(torch.device("cpu"), root, file_bytes=file_bytes, layer=layer, optim_numel=layer_numel, loaded=loaded)
    rates = bracket(before, after)
    p = rt.plan
    cand = candidate(shape, PlanConfig(batch=batch, device="cpu"), batch.micro_batches, memory.prefetch_depth if p.weight_slots == memory.prefetch_depth + 1 else p.weight_slots - 1, p.opt_slots)
    assert cand.knobs["weight_slots"] == p.weight_slots and cand.knobs["opt_slots"] == p.opt_slots, (cand.knobs, p)
    pred = predict(cand.build(), rates)
    later = results[1:]
    wall = statistics.median(r.seconds for r in later)
    spans = []
    fitted = []
    for r in later:
        spans.append((max(e.end_ns for e in r.events) - min(e.start_ns for e in r.events)) / 1e9)
        fitted.append(profile_step(r.events).predicted.get("fitted from this trace", float("nan")))
    mid = sorted(later, key=lambda r: r.seconds)[len(later) // 2].events
    prof = profile_step(mid)
    return {
        "name": name, "slots": f"W{p.weight_slots} O{p.opt_slots}", "params": store.numel(), "pred": pred.step_s, "bottleneck": pred.bottleneck,
        "wall": wall, "span": statistics.median(spans), "fitted": statistics.median(fitted), "steps": [r.seconds for r in results],
        "rates": rates, "fitted_rates": fit_rates(mid, rates), "busy_pred": pred.busy_fraction(), "busy_meas": prof.busy, "stalls": prof.stalls_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--dir", default="/tmp/fuyou-bench-predict")
    ap.add_argument("--only", type=int, default=None, help="run only configuration i (0-based)")
    ap.add_argument("--probe-bytes", type=int, default=128 << 20, help="bytes of the storage probe")
    ap.add_argument("--isolated", action="store_true", help="probe each resource alone (not with the other lanes busy)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for probe and runs (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="the first configuration, 3 steps, a 32 MiB storage probe: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.only, args.steps, args.probe_bytes = 0, 3, 32 << 20
    if args.threads:
        # One compute thread: with two OpenMP threads on a loaded 2-vCPU box a layer's time swings
        # 20x run to run (one thread descheduled stalls the other at every barrier); one thread
        # swings under 3x, and leaves the second core to the I/O and optimizer lanes.
        torch.set_num_threads(args.threads)
    os.makedirs(args.dir, exist_ok=True)
    info = machine_info(torch.device("cpu"))
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_bytes'] / 2**30:.1f} GiB RAM, torch {info['torch']} "
          f"({info['torch_threads']} threads), {info['date']}; load average {os.getloadavg()[0]:.1f} at start (shared machine)")
    t0 = time.perf_counter()
    rows = []
    for i, (name, make_cfg, batch, memory) in enumerate(CONFIGS):
        if args.only is not None and i != args.only:
            continue
        r = run_config(name, make_cfg, batch, memory, args.dir, args.steps, args.probe_bytes, not args.isolated)
        rows.append(r)
        print(f"\n{name}: {r['params'] / 1e6:.1f} M params, slots {r['slots']}; steps (s) {', '.join(f'{s:.2f}' for s in r['steps'])}")
        for label, rt in (("probed", r["rates"]), ("fitted", r["fitted_rates"])):
            print(f"  {label:6} read {rt.read_Bps / 1e9:.2f} GB/s + {rt.latency_s.get('read', 0) * 1e3:.1f} ms, write {rt.write_Bps / 1e9:.2f} GB/s + "
                  f"{rt.latency_s.get('write', 0) * 1e3:.1f} ms, compute {rt.compute_flops / 1e9:.1f} GFLOP/s + {rt.compute_call_s * 1e3:.2f} ms/call "
                  f"+ {rt.latency_s.get('compute', 0) * 1e3:.2f} ms/task, optim {rt.optim_params_per_s / 1e6:.0f} M params/s")
        print("  busy predicted " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in r["busy_pred"].items()))
        print("  busy measured  " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in r["busy_meas"].items()))
        print("  compute stalls " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["stalls"].items()))
    print(f"\n{'configuration':32} {'predicted':>10} {'measured':>10} {'error':>8} {'graph span':>11} {'fitted-rate pred':>17}  bottleneck")
    for r in rows:
        err = (r["pred"] / r["wall"] - 1) * 100
        print(f"{r['name']:32} {r['pred']:9.3f}s {r['wall']:9.3f}s {err:+7.1f}% {r['span']:10.3f}s {r['fitted']:16.3f}s  {r['bottleneck']}")
    print(f"(measured: median of steps 2..{args.steps} of wall time per step incl. commit; graph span: first task start to last task end; "
          f"fitted-rate pred: the cost model with rates fitted from that step's own trace; total {time.perf_counter() - t0:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} at end)")


if __name__ == "__main__":
    main()
