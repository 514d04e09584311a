"""Predicted vs measured step time on this machine, over a matrix of runs that differ where the cost
model could be wrong: two model sizes, fp32 and fp8 optimizer states, fp8 compute weights, the
block cache on and off, recompute always and auto, block inputs offloaded by a small device budget,
1, 2 and 4 micro-batches, lean disk mode, clipping, the least host memory.

The machine is probed once, as `fuyou probe` does (storage, copies, optimizer with a decoder layer
computing; the compute rate at each model's own layer shape with storage busy), then each
configuration is planned exactly as `fuyou plan` plans a run with those settings (the runtime's
memory plan and step graph, its commit), every prediction made before any run; then the matrix is
run through the runtime in --sweeps sweeps (every other one in reverse order), and measured = the
median wall time of steps 2..N of all sweeps together. On a shared machine whose speed moves by
tens of percent for seconds at a time, a slow spell then decides no configuration alone, and the
table shows each sweep's median beside it (how far the same run moved: the noise any prediction
is up against). Prints the machine, the rates, a table with the error per configuration and the
range the probe's spread implies.

    python benchmarks/bench_predict.py [--steps 7] [--sweeps 2] [--dir /tmp/fuyou-bench-predict]
    python benchmarks/bench_predict.py --device cuda    # on the GPU machine (benchmarks/gpu_check.sh's predict stage)
    python benchmarks/bench_predict.py --quick          # the first configuration, 3 steps: a smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import machine_line, markdown_table, report_path, write_report  # noqa: E402
from fuyou.config import BatchConfig, FinetuneConfig, MemoryConfig, OptimConfig, StateConfig  # noqa: E402
from fuyou.data.dataset import Batch  # noqa: E402
from fuyou.model.importer import import_model  # noqa: E402
from fuyou.model.skeleton import Skeleton  # noqa: E402
from fuyou.model.source import ModelSource, preset_config  # noqa: E402
from fuyou.planning.calibrate import calibrate, in_step_rates  # noqa: E402
from fuyou.planning.probe import probe_rates  # noqa: E402
from fuyou.planning.probe_compute import layer_shape_of  # noqa: E402
from fuyou.planning.rates import rate_bounds  # noqa: E402
from fuyou.planning.search import model_shape, planned_graph, redo_s, run_memory_plan, run_step_spec  # noqa: E402
from fuyou.planning.settings import PlanConfig  # noqa: E402
from fuyou.step.graph import LANES  # noqa: E402
from fuyou.step.slot_sizes import least_slot_bytes  # noqa: E402
from fuyou.step.runtime import Runtime  # noqa: E402
from fuyou.store.directio import aligned_bytes  # noqa: E402
from scheduler.costmodel import Rates, predict  # noqa: E402


def tiny():
    return preset_config("llama-tiny", 4096)


def mid():
    """A 12-layer hidden-512 Llama (36 M params): ten times llama-tiny's layers' work per step."""
    cfg = preset_config("llama-tiny", 4096)
    for k, v in dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8).items():
        setattr(cfg, k, v)
    return cfg


MODELS = {"llama-tiny": tiny, "12x512": mid}
B8 = BatchConfig(batch_size=8, micro_batches=2, seq_len=128)
FP8 = StateConfig(master="bf16+rem", states="fp8")
OFF = MemoryConfig(cache_mem_bytes=0)


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    state: StateConfig = StateConfig()
    memory: Union[MemoryConfig, str] = OFF  # "offload": a device budget one layer's inputs short; "least host": the minimum host slots
    batch: BatchConfig = B8
    disk_mode: str = "safe"
    clip: Optional[float] = None


CONFIGS = [
    Config("llama-tiny, defaults (block cache on)", "llama-tiny", memory=MemoryConfig()),
    Config("llama-tiny, cache off", "llama-tiny"),
    Config("llama-tiny, fp8 states", "llama-tiny", state=FP8),
    Config("llama-tiny, fp8 weights + states", "llama-tiny", state=dataclasses.replace(FP8, weights="fp8")),
    Config("llama-tiny, recompute always", "llama-tiny", memory=dataclasses.replace(OFF, recompute="always")),

    Config("llama-tiny, 4 micro-batches", "llama-tiny", batch=dataclasses.replace(B8, micro_batches=4)),
    Config("llama-tiny, lean disk mode", "llama-tiny", disk_mode="lean"),
    Config("llama-tiny, clipped every step", "llama-tiny", clip=1e-3),
    Config("12x512, cache off", "12x512", batch=BatchConfig(batch_size=4, micro_batches=1, seq_len=128)),
    Config("12x512, inputs offloaded", "12x512", memory="offload", batch=BatchConfig(batch_size=4, micro_batches=2, seq_len=128)),
    Config("12x512, fp8 states, least host memory", "12x512", state=FP8, memory="least host", batch=BatchConfig(batch_size=4, micro_batches=2, seq_len=128)),
]


def memory_of(c: Config, shape, plan_cfg: PlanConfig) -> MemoryConfig:
    if isinstance(c.memory, MemoryConfig):
        return c.memory
    full = run_memory_plan(shape, plan_cfg, c.batch, MemoryConfig(cache_mem_bytes=0, recompute="always"))
    if c.memory == "offload":  # the block inputs of one layer more than the device budget holds: they go to the host
        return MemoryConfig(cache_mem_bytes=0, recompute="always", gpu_mem_bytes=full.device_bytes() - full.micro_batches * aligned_bytes(full.act_bytes))
    # One weight slot, one optimizer slot, one gradient slot (plus a tied embedding's own).
    least = full.stage_slot_bytes + least_slot_bytes(shape.store, shape.tied)
    return MemoryConfig(cache_mem_bytes=0, cpu_mem_bytes=least)


def probe(args, root: str) -> tuple:
    """Rates of this machine, probed once as `fuyou probe --model M` does: storage, copies and the
    optimizer with a decoder layer computing, then compute on each model's own blocks (calibrate.py,
    at 1, 2 and 4 sequences per micro-batch, both backward modes, the other lanes timed in the same
    steps). (the probe's own rates, {model: (Rates, spread)})."""
    rates, details = probe_rates(torch.device(args.device), root, file_bytes=args.probe_bytes, layer=dict(layer_shape_of(tiny()), batch=4, seq_len=128),
                                 loaded=True)
    out = {}
    for name, make in MODELS.items():
        cal = calibrate(make(), device=torch.device(args.device), seq_len=128, rows=(1, 2, 4), store_dir=root)
        out[name] = in_step_rates(rates, details["spread"], cal)
    return rates, out


def plan_config(c: Config, rates: Rates, spread: dict, device: str = "cpu") -> dict:
    """The prediction for configuration `c`, from its settings alone (as `fuyou plan` makes it), and
    what its run is built with."""
    hf = MODELS[c.model]()
    plan_cfg = PlanConfig(state=c.state, batch=c.batch, job=FinetuneConfig(disk_mode=c.disk_mode, max_grad_norm=c.clip), device=device)
    shape = model_shape(hf, c.state)
    memory = memory_of(c, shape, plan_cfg)
    spec = run_step_spec(shape, plan_cfg, c.batch, run_memory_plan(shape, plan_cfg, c.batch, memory))
    graph = planned_graph(shape, spec, c.batch.micro_batches)
    codec_rates = [r.for_codec(c.state.states, c.state.master, c.state.weights) for r in (rates, *rate_bounds(rates, spread))]
    # every step is clipped when c.clip is set: its optimizer pass is redone
    predictions = [predict(graph, r, LANES) for r in codec_rates]
    pred, slow, fast = (p.step_s + (redo_s(spec, r) if c.clip is not None else 0.0) for p, r in zip(predictions, codec_rates))
    return {"config": c, "pred": pred, "slow": slow, "fast": fast, "params": shape.numel, "bottleneck": predictions[0].bottleneck,
            "hf": hf, "memory": memory, "spec": spec, "device": device}


def measure_config(planned: dict, root: str, steps: int) -> list:
    """Seconds of each of `steps` steps of the planned configuration, run through the runtime from
    a fresh store (random init)."""
    c, hf = planned["config"], planned["hf"]
    store_dir = os.path.join(root, "store")
    shutil.rmtree(store_dir, ignore_errors=True)
    store = import_model(ModelSource.from_config(hf, c.model), store_dir, c.state)
    rt = Runtime(store, Skeleton(hf), device=torch.device(planned["device"]), memory=planned["memory"], batch=c.batch, optim=OptimConfig(lr=1e-4),
                 max_grad_norm=c.clip, disk_mode=c.disk_mode)
    assert rt.spec == planned["spec"], f"{c.name}: the planned step is not the runtime's"
    g = torch.Generator().manual_seed(0)
    try:
        results = []
        for _ in range(steps):
            ids = torch.randint(0, hf.vocab_size, (c.batch.batch_size, c.batch.seq_len), generator=g)
            results.append(rt.step(Batch(ids, ids.clone(), None)))
    finally:
        rt.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return [r.seconds for r in results]


def measured(planned: dict, sweeps: list) -> dict:
    """The row of a configuration: measured = the median of steps 2..N of every sweep together;
    each sweep's own median beside it (their difference is the machine's noise)."""
    per_sweep = [statistics.median(s[1:]) for s in sweeps]
    return dict(planned, wall=statistics.median(x for s in sweeps for x in s[1:]), sweeps=per_sweep)


def render(rows, info: str, raw: Rates, rates_by_model: dict, args, seconds: float) -> str:
    errs = [abs(r["pred"] / r["wall"] - 1) * 100 for r in rows]
    table = markdown_table(
        ["configuration", "params", "predicted s", "range (probe spread)", "measured s", "sweeps' medians", "error", "bottleneck"],
        [[r["config"].name, f"{r['params'] / 1e6:.1f} M", f"{r['pred']:.3f}", f"{r['fast']:.3f} - {r['slow']:.3f}", f"{r['wall']:.3f}",
          " / ".join(f"{x:.3f}" for x in r["sweeps"]), f"{(r['pred'] / r['wall'] - 1) * 100:+.1f}%", r["bottleneck"]] for r in rows])
    # How far apart the same configuration measured in its sweeps: the machine's own noise.
    noise = [(max(r["sweeps"]) / min(r["sweeps"]) - 1) * 100 for r in rows if len(r["sweeps"]) > 1]
    rates = [f"- probe: storage read {raw.read_Bps / 1e9:.2f} GB/s, write {raw.write_Bps / 1e9:.2f} GB/s; optimizer {raw.optim_params_per_s / 1e6:.0f} M "
             f"params/s (fp8 states {raw.optim_by_codec.get('fp8/bf16+rem', 0) / 1e6:.0f}); host copy {raw.copy_Bps / 1e9:.1f} GB/s"]
    for m, (r, _s) in rates_by_model.items():
        lat = r.latency_s
        rates += [f"- {m}, in its calibration steps: read {r.read_Bps / 1e9:.2f} GB/s + {lat.get('read', 0) * 1e3:.1f} ms, write {r.write_Bps / 1e9:.2f} GB/s + "
                  f"{lat.get('write', 0) * 1e3:.1f} ms, optimizer {r.optim_params_per_s / 1e6:.0f} M params/s + {lat.get('optim', 0) * 1e3:.1f} ms per task; "
                  "compute per kind of work (GFLOP/s + ms per call): "
                  + ", ".join(f"{w} {v[0] / 1e9:.0f} + {v[1] * 1e3:.1f}" if v[0] > 1 else f"{w} {v[1] * 1e3:.1f} ms" for w, v in sorted(r.compute_by_work.items()))]
    return "\n".join([
        "# bench_predict: predicted vs measured step time", "", f"Machine: {info}.", "",
        f"Probed once ({args.probe_bytes >> 20} MiB storage probe, other lanes busy), torch threads {torch.get_num_threads()}:", "", *rates, "",
        f"Measured: the median wall time of steps 2..{args.steps} (commit included)"
        + (f" of {args.sweeps} sweeps over the matrix together, every other sweep in reverse order, so that a slow spell of the machine "
           "hits a configuration in one sweep only." if args.sweeps > 1 else "."), "", table, "",
        f"|error|: median {statistics.median(errs):.1f}%, largest {max(errs):.1f}%; {sum(e <= 10 for e in errs)} of {len(errs)} within 10%, "
        f"{sum(e <= 20 for e in errs)} within 20%."
        + (f" The same configuration's sweeps differed by {statistics.median(noise):.1f}% (median; largest {max(noise):.1f}%)." if noise else "")
        + f" Run took {seconds:.0f} s; load average {os.getloadavg()[0]:.1f} at the end.",
    ]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--sweeps", type=int, default=2, help="times the matrix is run (every other sweep in reverse order); measured pools their steps")
    ap.add_argument("--dir", default="/tmp/fuyou-bench-predict")
    ap.add_argument("--only", type=int, default=None, help="run only configuration i (0-based)")
    ap.add_argument("--probe-bytes", type=int, default=128 << 20, help="bytes of the storage probe")
    # One compute thread by default: with two OpenMP threads on a shared 2-vCPU box a layer's time
    # swings 20x run to run (one thread descheduled stalls the other at every barrier); with one,
    # under 3x, and the second core is left to the I/O and optimizer lanes.
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for probe and runs (0: torch's default; default 1 on the CPU device, "
                    "torch's default on CUDA, where the host threads run the optimizer and I/O beside the GPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the device the runs compute on (cuda: the GPU machine's check)")
    ap.add_argument("--quick", action="store_true", help="the first configuration, 3 steps, a 32 MiB storage probe: a smoke run")
    ap.add_argument("--out", default=None, help="write the report here (default: benchmarks/results/bench_predict.md for a full run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.only, args.steps, args.probe_bytes, args.sweeps = 0, 3, 32 << 20, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(args.dir, exist_ok=True)
    info = f"{machine_line()}; load average {os.getloadavg()[0]:.1f} at the start"
    t0 = time.perf_counter()
    raw, rates_by_model = probe(args, args.dir)
    chosen = [c for i, c in enumerate(CONFIGS) if args.only is None or i == args.only]
    planned = [plan_config(c, *rates_by_model[c.model], device=args.device) for c in chosen]  # every prediction before any run
    sweeps: list = [[] for _ in planned]
    for s in range(args.sweeps):
        for i in (range(len(planned)) if s % 2 == 0 else reversed(range(len(planned)))):
            secs = measure_config(planned[i], args.dir, args.steps)
            sweeps[i].append(secs)
            print(f"sweep {s + 1}, {planned[i]['config'].name}: predicted {planned[i]['pred']:.3f} s, measured {statistics.median(secs[1:]):.3f} s; "
                  f"steps {', '.join(f'{x:.2f}' for x in secs)}", flush=True)
    rows = [measured(p, sw) for p, sw in zip(planned, sweeps)]
    write_report(render(rows, info, raw, rates_by_model, args, time.perf_counter() - t0), report_path(args.out, args.quick, "bench_predict.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
