"""Handlers of `fuyou plan`, `fuyou probe` and `fuyou profile`, and the plan's tables."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import psutil

from ..config import flag_of
from ..planning.settings import RatesConfig
from .commands import PlanCommand, ProbeCommand, ProfileCommand

RATE_FIELDS = {  # RatesConfig field -> (Rates field, scale from the flag's unit)
    "read_gbps": ("read_Bps", 1e9),
    "write_gbps": ("write_Bps", 1e9),
    "h2d_gbps": ("h2d_Bps", 1e9),
    "d2h_gbps": ("d2h_Bps", 1e9),
    "compute_tflops": ("compute_flops", 1e12),
    "optim_mparams": ("optim_params_per_s", 1e6),
    "collective_gbps": ("collective_Bps", 1e9),
}


def _device(name: Optional[str]) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible; pass --device cpu")
    return name


def resolve_rates(given: RatesConfig, device: str):
    """(Rates, sentence naming where they came from): file or saved probe, then the rates given by hand."""
    from ..planning.rates import load_rates, read_rates_file

    if given.path:
        rates, _m = read_rates_file(given.path)
        source = f"from {given.path}"
    else:
        rates, source = load_rates(device)
    by_hand = given.given()
    changes = {RATE_FIELDS[name][0]: v * RATE_FIELDS[name][1] for name, v in by_hand.items() if name in RATE_FIELDS}
    if "optim_params_per_s" in changes:
        changes["optim_by_codec"] = {}  # the rate given by hand is the one to plan with, whatever the codec
    if given.ssd_gbps is not None:
        changes.setdefault("read_Bps", given.ssd_gbps * 1e9)
        changes.setdefault("write_Bps", given.ssd_gbps * 1e9)
    if changes:
        rates = rates.replace(**changes)
        named = [flag_of(f) for f in dataclasses.fields(given) if f.name in by_hand]
        source += "; overridden by flags: " + ", ".join(named)
    return rates, source


def resolve_spread(given: RatesConfig, source: str) -> dict:
    """The probe's spread of the rates the plan uses ({} for defaults); a rate given by hand has none."""
    from ..planning.rates import load_spread, rates_path

    path = given.path or (rates_path() if source.startswith("probed") else None)
    spread = load_spread(path) if path else {}
    fixed = {RATE_FIELDS[name][0] for name in given.given() if name in RATE_FIELDS}
    if given.ssd_gbps is not None:
        fixed |= {"read_Bps", "write_Bps"}
    return {k: v for k, v in spread.items() if k not in fixed and not (k == "optim_by_codec" and "optim_params_per_s" in fixed)}


def plan_command(cmd: PlanCommand, _given: set) -> int:
    from rich.console import Console

    from ..planning.search import make_plan

    device = cmd.device or _device(None)
    rates, source = resolve_rates(cmd.rates, device)
    planned = make_plan(dataclasses.replace(cmd.plan, device=device), rates, source, spread=resolve_spread(cmd.rates, source))
    console = Console()
    render_plan(planned, console)
    note = _uncalibrated_note(cmd, source)
    if note:
        console.print(f"[bold yellow]note[/]: {note}")
    if cmd.explain and planned.fits:
        from ..step.schedule import describe

        console.print(describe(planned.result.best.candidate.extra["spec"]), highlight=False, soft_wrap=True)
    return 0 if planned.fits else 1


def _uncalibrated_note(cmd: PlanCommand, source: str) -> Optional[str]:
    """What to run when the saved probe did not time the planned model's own blocks in real steps."""
    from ..planning.rates import rates_path, saved_details

    if cmd.rates.path or not source.startswith("probed"):
        return None
    model = cmd.plan.model
    details = saved_details(rates_path())
    on = details.get("calibrated_on")
    if on == model:
        return None
    skipped = details.get("not_calibrated")
    if isinstance(skipped, dict) and skipped.get("model") == model:  # the probe was asked and could not: say why, not the same command again
        return (f"the probe could not time {model}'s blocks in steps ({skipped.get('why', '?')}): the plan's storage and optimizer lanes are "
                "the probes' alone, which a step on a small machine runs slower")
    return (f"the saved probe did not time {model}'s blocks" + (f" (it timed {on}'s)" if on else "") + f"; `fuyou probe --model {model}` "
            "measures its compute and the storage and optimizer lanes inside real steps, as the runtime shares the cores between them "
            "(on a 2-core machine those lanes ran 2-4x slower in a step than probed alone), and the plan then uses those rates")


def probe_command(cmd: ProbeCommand, _given: set) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..planning.probe import probe_rates
    from ..planning.rates import machine_info, rates_table, save_rates

    if not os.path.isdir(cmd.store_dir):
        raise ValueError(f"--store-dir {cmd.store_dir} is not a directory; pass a directory on the disk the store will use")
    device = torch.device(_device(cmd.device))
    console = Console()
    layer = {"hidden": cmd.hidden, "intermediate": cmd.intermediate, "heads": cmd.heads, "kv_heads": cmd.heads, "batch": max(1, cmd.tokens // 128), "seq_len": 128}
    log = lambda s: console.print(s, style="dim")  # noqa: E731
    hf = None
    if cmd.model is not None:
        from ..planning.probe_compute import layer_shape_of
        from ..planning.search import load_model_config

        hf = load_model_config(cmd.model)
        layer.update(layer_shape_of(hf))
    rates, details = probe_rates(device, cmd.store_dir, file_bytes=cmd.size, layer=layer, loaded=not cmd.isolated, log=log)
    if hf is not None:
        rates, details = _calibrated(rates, details, hf, cmd, device, log)
    path = save_rates(rates, details, device, cmd.out)
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
    if "calibrated_on" in details:
        console.print(f"* the default I/O backend. Storage and optimizer rates above: as the runtime's own tasks took them in steps of "
                      f"{details['calibrated_on']}'s blocks (the per-task cost included); the backends' rates: the storage probe alone")
    else:
        console.print("* the default I/O backend: the storage rates above are its, probed with a decoder layer computing")
    console.print(f"saved to {path}")
    return 0


CALIBRATION_MAX_BYTES = 4 << 30  # the scratch store of the model cut to two layers, at most (beyond: the layer probe's rate)


def _calibrated(rates, details: dict, hf, cmd: ProbeCommand, device, log):
    """The rates with compute, and the storage and optimizer lanes, measured in steps of the model's
    own blocks (planning/calibrate.py), when the model cut to two layers is small enough to train
    here for a moment."""
    import copy

    from ..memory import format_bytes
    from ..model.skeleton import Skeleton
    from ..planning.calibrate import CALIBRATION_LAYERS, calibrate, in_step_rates

    small = copy.deepcopy(hf)
    small.num_hidden_layers = min(CALIBRATION_LAYERS, hf.num_hidden_layers)
    need = 16 * Skeleton(small).numel()  # fp32 weights, master and moments
    if need > CALIBRATION_MAX_BYTES:
        why = (f"the model cut to {small.num_hidden_layers} layers needs {format_bytes(need)} of store, more than "
               f"{format_bytes(CALIBRATION_MAX_BYTES)}")
        log(f"{cmd.model}'s blocks not timed in steps ({why}): the layer probe's compute rate and the storage and optimizer probes' rates stand")
        return rates, dict(details, not_calibrated={"model": cmd.model, "why": why})
    rows = max(1, cmd.tokens // 128)
    cal = calibrate(hf, device=device, seq_len=128, rows=sorted({1, max(1, rows // 2), rows}), store_dir=cmd.store_dir, log=log)
    rates, spread = in_step_rates(rates, details.get("spread"), cal)
    return rates, dict(details, calibrated_on=cmd.model, spread=spread)


def profile_command(cmd: ProfileCommand, _given: set) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..planning.profile import draw_timeline, load_chrome_trace, pick_step, profile_step, steps_of, summary_rows

    events = load_chrome_trace(cmd.trace)
    by_step = steps_of(events)
    step = pick_step(by_step, cmd.step)
    rates = {}
    if cmd.rates.path or cmd.rates.given() or _saved_rates_exist():
        r, source = resolve_rates(cmd.rates, "cuda" if any(e.kind == "h2d" for e in events) and _device(None) == "cuda" else "cpu")
        rates[source.split(" (")[0]] = r
    prof = profile_step(by_step[step], rates)
    png = cmd.png or os.path.join(os.path.dirname(os.path.abspath(cmd.trace)), "timeline.png")
    draw_timeline(by_step[step], png, prof.prediction, title=f"step {step}: measured, and predicted with rates fitted from the trace")
    spans = [(max(e.end_ns for e in v) - min(e.start_ns for e in v)) / 1e9 for k, v in sorted(by_step.items())][1:]
    t = Table(title=f"fuyou profile: {cmd.trace}")
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

    from ..planning.rates import rates_table
    from ..planning.search import RULE_KNOBS

    console.print(_plan_table(plan))
    if not plan.result.best:
        from ..planning.search import minimum_message

        console.print(f"[bold red]no plan fits[/]: {minimum_message(plan)}")
    else:
        console.print(f"run it with: {suggested_command(plan)}", soft_wrap=True)  # one line, to copy
        for line in memory_warnings(plan):
            console.print(f"[bold yellow]warning[/]: {line}")
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


def _plan_table(plan):
    """The chosen plan beside the naive one: knobs, bytes per tier, predicted step, lanes, traffic."""
    from rich.table import Table

    from ..memory import format_bytes
    from ..step.graph import bytes_per_step

    cfg, res = plan.cfg, plan.result
    b = cfg.batch
    head = (f"fuyou plan: {cfg.model} ({plan.shape.numel / 1e9:.3f} B params, {plan.shape.store.state.cfg.weights} weights), "
            f"batch {b.batch_size} x {b.seq_len} tokens on {cfg.device}"
            + (f", {cfg.ranks} ranks (one rank's share: {b.batch_size // cfg.ranks} rows, the optimizer state of its blocks)" if cfg.ranks > 1 else "")
            + (f", LoRA r {cfg.peft.r} on the frozen base" if plan.shape.frozen else ""))
    budgets = {"gpu": cfg.gpu_mem_bytes, "cpu": cfg.cpu_mem_bytes, "ssd": cfg.ssd_bytes}
    t = Table(title=head)
    t.add_column("")
    t.add_column("chosen plan" if res.best else "no plan fits")
    t.add_column("naive plan (depth 0" + (")" if plan.shape.frozen else ", 1 optimizer slot)"))
    rows = [res.best, res.naive]
    for k in ("prefetch_depth", "micro_batches", "opt_slots", "weight_slots", "device_slots", "edge_slot"):
        t.add_row(k.replace("_", " "), *[str(e.candidate.knobs[k]) if e else "-" for e in rows])
    for tier in ("gpu", "cpu", "ssd"):
        lim = budgets[tier]
        t.add_row(f"{tier} bytes (budget {format_bytes(lim) if lim else 'none'})", *[format_bytes(e.candidate.memory_bytes[tier]) if e else "-" for e in rows])
        if tier == "gpu" and plan.shape.frozen:
            t.add_row(f"  of it: adapters ({plan.shape.adapter_numel / 1e6:,.1f} M params; values, grads, AdamW)",
                      *[format_bytes(plan.shape.adapter_device_bytes()) if e else "-" for e in rows])
    t.add_row(f"block cache (--cache-mem {format_bytes(cfg.cache_mem_bytes) if cfg.cache_mem_bytes is not None else 'auto'})",
              *[format_bytes(e.candidate.memory_bytes.get("cache", 0)) if e else "-" for e in rows])
    t.add_row("predicted step", *[f"{e.step_s:.3f} s" if e else "-" for e in rows])
    if plan.range_s:
        t.add_row("  range (the probe's spread)", f"{plan.range_s[0]:.3f} - {plan.range_s[1]:.3f} s", "")
    if plan.clipped_s:
        t.add_row("  a clipped step (redone optimizer)", f"{plan.clipped_s:.3f} s", "")
    tokens = b.batch_size * b.seq_len
    t.add_row("predicted tokens/s", *[f"{tokens / e.step_s:,.1f}" if e and e.step_s else "-" for e in rows])
    t.add_row("bottleneck", *[e.prediction.bottleneck if e else "-" for e in rows])
    for lane in sorted({k for e in rows if e for k in e.prediction.busy_s}):
        t.add_row(f"busy {lane}", *[f"{e.prediction.busy_fraction().get(lane, 0) * 100:.0f}%" if e else "-" for e in rows])
    for tier in ("ssd read", "ssd written", "cpu->gpu") + (("between ranks",) if cfg.ranks > 1 else ()):
        t.add_row(f"{tier} per step", *[f"{bytes_per_step(e.prediction.trace.events)[tier] / 1e9:.3f} GB" if e else "-" for e in rows])
    return t


def suggested_command(plan) -> str:
    """The command that runs the chosen plan: its knobs and the settings the plan was made for."""
    cfg, b, m = plan.cfg, plan.cfg.batch, plan.memory_config()
    launch = f"torchrun --nproc-per-node {cfg.ranks} -m fuyou finetune --store 'STORE{{rank}}'" if cfg.ranks > 1 else "fuyou finetune"
    if plan.shape.frozen:
        launch += f" --peft lora --lora-r {cfg.peft.r}" + (f" --target-modules {cfg.peft.target_modules}" if cfg.peft.target_modules else "")
    flags = [("--cache-mem", cfg.cache_mem_bytes is not None and _mib(cfg.cache_mem_bytes)), ("--weights", cfg.state.weights != "fp32" and cfg.state.weights),
             ("--master", cfg.state.master != "fp32" and cfg.state.master), ("--optim-states", cfg.state.states != "fp32" and cfg.state.states),
             ("--recompute", cfg.memory.recompute != "auto" and cfg.memory.recompute), ("--disk-mode", cfg.job.disk_mode != "safe" and cfg.job.disk_mode),
             ("--max-grad-norm", cfg.job.max_grad_norm is not None and f"{cfg.job.max_grad_norm:g}")]
    return (f"{launch} --model {cfg.model} --batch-size {b.batch_size} --seq-len {b.seq_len} --micro-batches {plan.batch_config().micro_batches} "
            f"--prefetch-depth {m.prefetch_depth} --cpu-mem {_mib(m.cpu_mem_bytes)} --gpu-mem {_mib(m.gpu_mem_bytes)}"
            + "".join(f" {flag} {value}" for flag, value in flags if value))


def memory_warnings(plan) -> list:
    """Where the chosen plan needs more memory than this machine has (a plan for a larger machine)."""
    from ..memory import format_bytes

    out, m = [], plan.memory_config()
    host = m.cpu_mem_bytes + plan.result.best.candidate.memory_bytes.get("cache", 0)
    ram = psutil.virtual_memory().total
    if host > ram:
        out.append(f"the plan's host memory ({format_bytes(host)}: --cpu-mem and --cache-mem) exceeds this machine's RAM ({format_bytes(ram)}); "
                   "it is a plan for a larger machine, or lower --batch-size / --seq-len")
    import torch

    if plan.cfg.device == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        if m.gpu_mem_bytes > total:
            out.append(f"--gpu-mem {format_bytes(m.gpu_mem_bytes)} exceeds this machine's GPU ({format_bytes(total)}); it is a plan for a larger GPU")
    return out


def _saved_rates_exist() -> bool:
    from ..planning.rates import rates_path

    return os.path.isfile(rates_path())


def _mib(n: int) -> str:
    """A budget as a whole number of MiB, rounded up (never below what the plan needs)."""
    return f"{-(-int(n) // (1 << 20))}MiB"
