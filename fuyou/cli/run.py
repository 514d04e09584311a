"""Handlers of `fuyou finetune` and `fuyou export`: settings in, the library call, a summary out.
Heavy modules (torch, the runtime) are imported inside, so `fuyou --help` stays fast."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

from ..config import FinetuneConfig
from ..planning.settings import PlanConfig
from .commands import ExportCommand, FinetuneCommand


def finetune_command(cmd: FinetuneCommand, given: set) -> int:
    """`given`: the settings the command line names (a resumed run refuses those that differ from its own)."""
    from .. import train
    from ..dist.group import launched_by_torchrun
    from ..lora import job as lora
    from ..progress import print_summary

    # Adapters on a frozen base are a run of their own kind.
    finetune, prepare = (lora.finetune_lora, lora.prepare) if cmd.job.peft.method is not None else (train.finetune, train.prepare)
    job = {path[len("job."):] for path in given if path.startswith("job.")}
    if cmd.print_config:
        from .config_file import to_toml

        print(to_toml(prepare(cmd.job, job).cfg), end="")
        return 0
    cfg = cmd.job
    if launched_by_torchrun():  # one process per rank of a data-parallel run
        return _finetune_ranks(cfg, job, cmd.plan)
    if cmd.plan == "auto":  # the planner's budgets count as given: a resumed run takes them
        cfg = _planned(prepare(cmd.job, job).cfg)
        job |= {f"memory.{f.name}" for f in dataclasses.fields(cfg.memory)}
    console = _console()
    res = finetune(cfg, given=job, console=console, trace=_trace(cfg))
    print_summary(res, console)
    return EXIT_CODES[res.stopped]


EXIT_CODES = {None: 0, "SIGINT": 130, "SIGTERM": 143}  # stopped early: the shell's codes for those signals


def _console(quiet: bool = False):
    from rich.console import Console

    if quiet:  # a rank other than the first: rank 0 reports the run
        return Console(file=open(os.devnull, "w"), stderr=False)
    probe = Console(stderr=True)
    return probe if probe.is_terminal else Console(stderr=True, width=250)  # logs: one line per report


def _trace(cfg: FinetuneConfig):
    if not cfg.trace_dir:
        return None
    from scheduler import Trace

    return Trace()


def _finetune_ranks(cfg: FinetuneConfig, given: set, plan: Optional[str]) -> int:
    """`torchrun --nproc-per-node N -m fuyou finetune ...`: this process's rank of the run."""
    from ..dist.group import RankGroup
    from ..progress import print_summary
    from ..train import finetune

    if plan == "auto":
        raise ValueError("--plan auto plans one process; with ranks, plan one rank's share with fuyou plan --ranks N and pass its budgets")
    group = RankGroup.from_env()
    try:
        console = _console(quiet=not group.is_main)
        res = finetune(cfg, given=given, console=console, trace=_trace(cfg), group=group)
        print_summary(res, console)
        return EXIT_CODES[res.stopped]
    finally:
        group.close()


def _planned(cfg: FinetuneConfig) -> FinetuneConfig:
    """`--plan auto`: the job with the memory and batch settings the planner chooses within its budgets."""
    from ..planning.search import auto_memory_config
    from ..train import resolve_device

    m = cfg.memory
    plan_cfg = PlanConfig(
        model=cfg.model, batch=cfg.batch, state=cfg.state, device=resolve_device(cfg.device).type, gpu_mem_bytes=m.gpu_mem_bytes,
        cpu_mem_bytes=m.cpu_mem_bytes, cache_mem_bytes=m.cache_mem_bytes,
        search_micro_batches=not cfg.resume,  # a resumed run keeps its micro-batches (they shape the accumulation)
    )
    mem, batch = auto_memory_config(plan_cfg)
    return dataclasses.replace(cfg, memory=mem, batch=batch)  # mem carries --cache-mem through PlanConfig


def export_command(cmd: ExportCommand, _given: set) -> int:
    from ..export import export_store

    if cmd.run_dir is not None:
        from ..lora.export import export_run

        out = export_run(cmd.run_dir, cmd.to, cmd.dtype, merge=cmd.merge)
    else:
        out = export_store(cmd.store, cmd.to, cmd.dtype)
    print(f"exported {cmd.run_dir or cmd.store} to {out}", file=sys.stderr)
    return 0
