"""Handlers of `fuyou finetune` and `fuyou export`: settings in, the library call, a summary out.
Heavy modules (torch, the runtime) are imported inside, so `fuyou --help` stays fast."""
from __future__ import annotations

import dataclasses
import sys

from ..config import ExportCommand, FinetuneCommand, FinetuneConfig, PlanConfig


def finetune_command(cmd: FinetuneCommand) -> int:
    from rich.console import Console

    from ..train import finetune, print_summary

    cfg = cmd.job if cmd.plan is None else _planned(cmd.job)
    trace = None
    if cfg.trace_dir:
        from scheduler import Trace

        trace = Trace()
    probe = Console(stderr=True)
    console = probe if probe.is_terminal else Console(stderr=True, width=250)  # logs: one line per report
    res = finetune(cfg, console=console, trace=trace)
    print_summary(res, console)
    return 0


def _planned(cfg: FinetuneConfig) -> FinetuneConfig:
    """`--plan auto`: the job with the memory and batch settings the planner chooses within its budgets."""
    from ..planning.search import auto_memory_config
    from ..train import resolve_device

    m = cfg.memory
    plan_cfg = PlanConfig(
        model=cfg.model, batch=cfg.batch, state=cfg.state, device=resolve_device(cfg.device).type, gpu_mem_bytes=m.gpu_mem_bytes,
        cpu_mem_bytes=m.cpu_mem_bytes, cache_mem_bytes=m.cache_mem_bytes,
    )
    mem, batch = auto_memory_config(plan_cfg)
    return dataclasses.replace(cfg, memory=mem, batch=batch)  # mem carries --cache-mem through PlanConfig


def export_command(cmd: ExportCommand) -> int:
    from ..export import export_store

    out = export_store(cmd.store, cmd.to)
    print(f"exported {cmd.store} to {out}", file=sys.stderr)
    return 0
