"""Subcommands `fuyou plan`, `fuyou probe` and `fuyou profile` (registered by cli.py)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from ..config import parse_size

RATE_FLAGS = (  # flag, Rates field, scale from the flag's unit
    ("read_gbps", "read_Bps", 1e9),
    ("write_gbps", "write_Bps", 1e9),
    ("h2d_gbps", "h2d_Bps", 1e9),
    ("d2h_gbps", "d2h_Bps", 1e9),
    ("compute_tflops", "compute_flops", 1e12),
    ("optim_mparams", "optim_params_per_s", 1e6),
)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def _add_rate_flags(p) -> None:
    g = p.add_argument_group("machine rates (default: the saved `fuyou probe` result, else conservative defaults)")
    g.add_argument("--rates", default=None, help="JSON file of rates (a `fuyou probe` output, or an object of Rates fields)")
    g.add_argument("--ssd-bw", dest="ssd_gbps", type=_positive, default=None, help="storage GB/s, read and write (unless given apart)")
    g.add_argument("--read-gbps", type=_positive, default=None, help="storage read GB/s")
    g.add_argument("--write-gbps", type=_positive, default=None, help="storage write GB/s")
    g.add_argument("--h2d-gbps", type=_positive, default=None, help="host -> device GB/s")
    g.add_argument("--d2h-gbps", type=_positive, default=None, help="device -> host GB/s")
    g.add_argument("--compute-tflops", type=_positive, default=None, help="model TFLOP/s of the compute device")
    g.add_argument("--optim-mparams", type=_positive, default=None, help="optimizer M params/s")


def add_subcommands(sub) -> None:
    """Register the planning/profiling subcommands on the `fuyou` parser's subparsers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("plan", help="choose prefetch depth, micro-batches and optimizer slots; predict the step", formatter_class=fmt,
                       description="Plan a run from the model's config alone (no weights needed): the fastest settings that fit the budgets, "
                       "the predicted step time, its bottleneck and the bytes per tier.")
    p.add_argument("--model", default="llama-tiny", help="preset (llama-tiny ... llama-70b) or a directory with config.json")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="compute device (default: cuda when present)")
    p.add_argument("--gpu-mem", type=_size, default=None, help="device memory budget (default: unconstrained)")
    p.add_argument("--cpu-mem", type=_size, default=None, help="host memory budget (default: unconstrained)")
    p.add_argument("--ssd-mem", type=_size, default=None, help="store capacity (default: unconstrained)")
    p.add_argument("--cache-mem", type=_size, default=0,
                   help="host RAM of the block cache (cached blocks' reads skip the store; `fuyou finetune` defaults to a quarter of the RAM)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches asked for (the planner may pick another divisor)")
    p.add_argument("--fixed-micro-batches", action="store_true", help="keep --micro-batches as given")
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="dtype of the compute weights kept in the store")
    p.add_argument("--master", choices=["fp32", "bf16+rem"], default="fp32", help="master weights codec")
    p.add_argument("--optim-states", choices=["fp32", "bf16", "fp8", "de8"], default="fp32", help="AdamW moments codec")
    p.add_argument("--max-prefetch-depth", type=int, default=4, help="deepest prefetch the planner considers")
    _add_rate_flags(p)

    q = sub.add_parser("probe", help="measure this machine's storage, copy, compute and optimizer rates", formatter_class=fmt)
    q.add_argument("--store-dir", default=".", help="directory on the disk the store will live on (a temporary file is written there)")
    q.add_argument("--size", type=_size, default=512 << 20, help="bytes written and read back by the storage probe")
    q.add_argument("--device", choices=["cuda", "cpu"], default=None, help="compute device (default: cuda when present)")
    q.add_argument("--hidden", type=int, default=1024, help="hidden size of the probed decoder layer")
    q.add_argument("--intermediate", type=int, default=2816, help="MLP size of the probed decoder layer")
    q.add_argument("--heads", type=int, default=16, help="attention heads of the probed layer")
    q.add_argument("--tokens", type=int, default=512, help="tokens per probed call (sequences of 128)")
    q.add_argument("--isolated", action="store_true", help="probe each resource alone (default: storage and optimizer with a layer computing, compute with storage busy, as in a step)")
    q.add_argument("--out", default=None, help="where to save the rates JSON (default: the user config dir, see `fuyou plan`)")

    r = sub.add_parser("profile", help="summarize a trace of `fuyou finetune --trace DIR`: timeline PNG and table", formatter_class=fmt)
    r.add_argument("--trace", required=True, help="DIR/trace.json written by `fuyou finetune --trace DIR`")
    r.add_argument("--step", type=int, default=None, help="step to show (default: the median-length step after the first)")
    r.add_argument("--png", default=None, help="timeline image path (default: beside the trace, timeline.png)")
    _add_rate_flags(r)


def _device(name: Optional[str]) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible; pass --device cpu")
    return name


def resolve_rates(args, device: str):
    """(Rates, sentence naming where they came from): file or saved probe, then flag overrides."""
    from ..planning.probe import load_rates, read_rates_file

    if args.rates:
        rates, _m = read_rates_file(args.rates)
        source = f"from {args.rates}"
    else:
        rates, source = load_rates(device)
    changes = {field: getattr(args, flag) * scale for flag, field, scale in RATE_FLAGS if getattr(args, flag) is not None}
    if "optim_params_per_s" in changes:
        changes["optim_by_codec"] = {}  # the rate given by hand is the one to plan with, whatever the codec
    if args.ssd_gbps is not None:
        changes.setdefault("read_Bps", args.ssd_gbps * 1e9)
        changes.setdefault("write_Bps", args.ssd_gbps * 1e9)
    named = (["--ssd-bw"] if args.ssd_gbps is not None else []) + [f"--{f.replace('_', '-')}" for f, _, _ in RATE_FLAGS if getattr(args, f) is not None]
    if changes:
        rates = rates.replace(**changes)
        source += "; overridden by flags: " + ", ".join(named)
    return rates, source


def _plan(args) -> int:
    from rich.console import Console

    from ..config import BatchConfig
    from ..optim.state import StateConfig
    from ..planning.search import PlanConfig, make_plan

    device = args.device or _device(None)
    if args.max_prefetch_depth < 0:
        raise ValueError("--max-prefetch-depth must be >= 0")
    cfg = PlanConfig(
        model=args.model,
        batch=BatchConfig(batch_size=args.batch_size, micro_batches=args.micro_batches, seq_len=args.seq_len),
        state=StateConfig(weights=args.weights, master=args.master, states=args.optim_states),
        device=device,
        gpu_mem_bytes=args.gpu_mem,
        cpu_mem_bytes=args.cpu_mem,
        ssd_bytes=args.ssd_mem,
        cache_mem_bytes=args.cache_mem,
        max_prefetch_depth=args.max_prefetch_depth,
        search_micro_batches=not args.fixed_micro_batches,
    )
    rates, source = resolve_rates(args, device)
    plan = make_plan(cfg, rates, source)
    render_plan(plan, Console())
    return 0 if plan.fits else 1


def _probe(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..planning.probe import machine_info, probe_rates, rates_table, save_rates

    if not os.path.isdir(args.store_dir):
        raise ValueError(f"--store-dir {args.store_dir} is not a directory; pass a directory on the disk the store will use")
    if args.hidden < 8 or args.tokens < 128 or args.heads < 1 or args.hidden % args.heads:
        raise ValueError("--hidden must be >= 8 and divisible by --heads, --tokens >= 128")
    device = torch.device(_device(args.device))
    console = Console()
    layer = {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.heads, "batch": max(1, args.tokens // 128), "seq_len": 128}
    rates, details = probe_rates(device, args.store_dir, file_bytes=args.size, layer=layer, loaded=not args.isolated, log=lambda s: console.print(s, style="dim"))
    path = save_rates(rates, details, device, args.out)
    info = machine_info(device)
    t = Table(title=f"fuyou probe: {info['cpu']}, {info['cores']} cores, {info['ram_bytes'] / 2**30:.1f} GiB RAM, {info['date']}")
    t.add_column("resource")
    t.add_column("rate")
    for k, v in rates_table(rates).items():
        t.add_row(k, v)
    t.add_row("plain GEMM (reference)", f"{details['matmul_flops'] / 1e12:.3f} TFLOP/s")
    from ..store.backends import default_backend_name

    for name, r in details.get("storage_by_backend", {}).items():
        rate = r.get("error") or f"read {r['read_Bps'] / 1e9:.2f} / write {r['write_Bps'] / 1e9:.2f} GB/s"
        t.add_row(f"{name} backend (alone)" + (" *" if name == default_backend_name() else ""), rate)
    console.print(t)
    console.print("* the default I/O backend: the storage rates above are its, probed with a decoder layer computing")
    console.print(f"saved to {path}")
    return 0


def _profile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..planning.profile import draw_timeline, load_chrome_trace, pick_step, profile_step, steps_of, summary_rows

    events = load_chrome_trace(args.trace)
    by_step = steps_of(events)
    step = pick_step(by_step, args.step)
    rates = {}
    if args.rates or args.ssd_gbps is not None or any(getattr(args, f) is not None for f, _, _ in RATE_FLAGS) or _saved_rates_exist():
        r, source = resolve_rates(args, "cuda" if any(e.kind == "h2d" for e in events) and _device(None) == "cuda" else "cpu")
        rates[source.split(" (")[0]] = r
    prof = profile_step(by_step[step], rates)
    png = args.png or os.path.join(os.path.dirname(os.path.abspath(args.trace)), "timeline.png")
    draw_timeline(by_step[step], png, prof.prediction, title=f"step {step}: measured, and predicted with rates fitted from the trace")
    spans = [(max(e.end_ns for e in v) - min(e.start_ns for e in v)) / 1e9 for k, v in sorted(by_step.items())][1:]
    t = Table(title=f"fuyou profile: {args.trace}")
    t.add_column("what")
    t.add_column("value")
    for k, v in summary_rows(prof, spans or None):
        t.add_row(k, v)
    console = Console(width=max(Console().width, 120))
    console.print(t)
    console.print(f"timeline: {png}")
    return 0


def render_plan(plan, console) -> None:
    """The plan as rich tables: the choice beside the naive plan, tiers, rates, knobs not yet built."""
    from rich.table import Table

    from ..memory import format_bytes
    from ..planning.search import RULE_KNOBS, tier_bytes_per_step
    from ..planning.probe import rates_table

    cfg, res = plan.cfg, plan.result
    b = cfg.batch
    head = (f"fuyou plan: {cfg.model} ({plan.shape.numel / 1e9:.3f} B params, {plan.shape.store.state.cfg.weights} weights), "
            f"batch {b.batch_size} x {b.seq_len} tokens on {cfg.device}")
    budgets = {"gpu": cfg.gpu_mem_bytes, "cpu": cfg.cpu_mem_bytes, "ssd": cfg.ssd_bytes}
    t = Table(title=head)
    t.add_column("")
    t.add_column("chosen plan" if res.best else "no plan fits")
    t.add_column("naive plan (depth 0, 1 optimizer slot)")
    rows = [res.best, res.naive]
    knob_names = ("prefetch_depth", "micro_batches", "opt_slots", "weight_slots", "device_slots")
    for k in knob_names:
        t.add_row(k.replace("_", " "), *[str(e.candidate.knobs[k]) if e else "-" for e in rows])
    for tier in ("gpu", "cpu", "ssd"):
        lim = budgets[tier]
        t.add_row(f"{tier} bytes (budget {format_bytes(lim) if lim else 'none'})", *[format_bytes(e.candidate.memory_bytes[tier]) if e else "-" for e in rows])
    t.add_row(f"block cache (--cache-mem {format_bytes(cfg.cache_mem_bytes) if cfg.cache_mem_bytes is not None else 'auto'})",
              *[format_bytes(e.candidate.memory_bytes.get("cache", 0)) if e else "-" for e in rows])
    t.add_row("predicted step", *[f"{e.step_s:.3f} s" if e else "-" for e in rows])
    tokens = b.batch_size * b.seq_len
    t.add_row("predicted tokens/s", *[f"{tokens / e.step_s:,.1f}" if e and e.step_s else "-" for e in rows])
    t.add_row("bottleneck", *[e.prediction.bottleneck if e else "-" for e in rows])
    lanes = sorted({k for e in rows if e for k in e.prediction.busy_s})
    for lane in lanes:
        t.add_row(f"busy {lane}", *[f"{e.prediction.busy_fraction().get(lane, 0) * 100:.0f}%" if e else "-" for e in rows])
    for tier in ("ssd read", "ssd written", "cpu->gpu"):
        t.add_row(f"{tier} per step", *[f"{tier_bytes_per_step(e.prediction)[tier] / 1e9:.3f} GB" if e else "-" for e in rows])
    console.print(t)
    if not res.best:
        from ..planning.search import minimum_message

        console.print(f"[bold red]no plan fits[/]: {minimum_message(plan)}")
    else:
        m = plan.memory_config()
        console.print(f"run it with: fuyou finetune --model {cfg.model} --batch-size {b.batch_size} --seq-len {b.seq_len} "
                      f"--micro-batches {plan.batch_config().micro_batches} --prefetch-depth {m.prefetch_depth} "
                      f"--cpu-mem {_mib(m.cpu_mem_bytes)} --gpu-mem {_mib(m.gpu_mem_bytes)}"
                      + (f" --cache-mem {_mib(cfg.cache_mem_bytes)}" if cfg.cache_mem_bytes is not None else "")
                      + (f" --weights {cfg.state.weights}" if cfg.state.weights != "fp32" else "")
                      + (f" --master {cfg.state.master}" if cfg.state.master != "fp32" else "")
                      + (f" --optim-states {cfg.state.states}" if cfg.state.states != "fp32" else ""))
    r = Table(title=f"rates: {plan.rates_source}")
    r.add_column("resource")
    r.add_column("rate")
    for k, v in rates_table(plan.rates).items():
        r.add_row(k, v)
    console.print(r)
    n = Table(title="knobs the memory plan sets by rule (not searched)")
    n.add_column("knob")
    n.add_column("rule")
    for k, v in RULE_KNOBS:
        n.add_row(k, v)
    console.print(n)


def _saved_rates_exist() -> bool:
    from ..planning.probe import rates_path

    return os.path.isfile(rates_path())


COMMANDS = {"plan": _plan, "probe": _probe, "profile": _profile}


def _mib(n: int) -> str:
    """A budget as a whole number of MiB, rounded up (never below what the plan needs)."""
    return f"{-(-int(n) // (1 << 20))}MiB"
