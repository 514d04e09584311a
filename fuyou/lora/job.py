"""`fuyou finetune --peft lora`: LoRA adapters trained on a frozen base that streams from its store.

The base store (--store) holds the compute weights alone (imported weights-only when it does not
exist yet; any fuyou store serves, only its weights are read) and is opened under a shared lock:
several adapter runs may train on one base, none may change it. The run directory (--run-dir)
holds the adapters and their AdamW state, committed with each step (fuyou.lora.run), under an
exclusive lock. Every check comes before the first byte, as for a full fine-tune.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Set

from rich.console import Console

from .. import loop
from ..config import FinetuneConfig
from ..loop import FinetuneResult
from ..model.importer import import_model
from ..model.skeleton import Skeleton
from ..model.source import ModelSource
from ..optim.state import StateCodecs
from ..progress import run_summary
from ..resume import given_settings
from ..step.memory_plan import plan_for_model
from ..step.runtime import Runtime
from ..store.lock import LOCK_FILE, StoreLock
from ..store.manifest import StoreError, fingerprint_config, is_store
from ..store.paths import check_store_target
from ..store.store import open_store
from ..summary import summary_lines
from ..train import Job, StoredModel, datasets_of, new_job, read_existing, resumed_job, resolve_device
from . import run as run_dir
from .adapters import Adapters, adapter_numel
from .trainer import LoraTrainer


def _check_run_target(cfg: FinetuneConfig) -> Optional[dict]:
    """The run directory's manifest when resuming; refuse a target that cannot hold a new run."""
    root = os.path.abspath(cfg.peft.run_dir)
    exists = run_dir.is_run(root)
    if cfg.resume and not exists:
        raise StoreError(f"--resume: {root} is not a fuyou LoRA run yet; drop --resume to start one there (--run-dir)")
    if exists and not cfg.resume and not cfg.overwrite:
        raise StoreError(f"{root} already holds step {run_dir.read(root)['step']} of a LoRA run; pass --resume to continue it or --overwrite")
    if os.path.isdir(root) and not exists and set(os.listdir(root)) - {LOCK_FILE}:
        raise StoreError(f"{root} is a non-empty directory that is not a fuyou LoRA run; choose an empty or new --run-dir")
    if os.path.exists(root) and not os.path.isdir(root):
        raise StoreError(f"--run-dir {root} is a file; pass a directory (it will be created)")
    return run_dir.read(root) if exists and cfg.resume else None


def _job(cfg: FinetuneConfig, given: Optional[Set[str]], existing_run: Optional[dict]) -> Job:
    """The run's settings resolved: a resumed run's from its record (its base store included)."""
    if existing_run is not None:
        base = existing_run["base"]["store"]
        given = given_settings(cfg, given)
        if "store" in given and os.path.abspath(cfg.store) != base:
            raise StoreError(f"--store {cfg.store} is not the base of the LoRA run in {cfg.peft.run_dir} ({base}); drop --store to resume it")
        cfg = dataclasses.replace(cfg, store=base)
        manifest = {"train": existing_run["train"], "model": {"fingerprint": existing_run["base"]["fingerprint"], "source": base}}
        return resumed_job(cfg, given, manifest, base)
    if is_store(cfg.store):  # an existing base: its own copy of the model
        path = os.path.abspath(cfg.store)
        manifest = read_existing(path)
        return dataclasses.replace(new_job(cfg, StoredModel.of(path, manifest)), existing=manifest)
    return new_job(cfg, ModelSource(cfg.model))


def prepare(cfg: FinetuneConfig, given: Optional[Set[str]] = None) -> Job:
    """The LoRA run's settings resolved and checked, nothing written (`--print-config`)."""
    return _job(cfg, given, _check_run_target(cfg))


def finetune_lora(cfg: FinetuneConfig, *, given: Optional[Set[str]] = None, console=None, trace=None) -> FinetuneResult:
    from ..store.backends import set_default_backend

    set_default_backend(cfg.io_backend)
    console = console or Console(stderr=True)
    existing_run = _check_run_target(cfg)
    with StoreLock(cfg.peft.run_dir):
        job = _job(cfg, given, existing_run)
        cfg = job.cfg
        if not is_store(cfg.store):
            check_store_target(os.path.abspath(cfg.store))
            with StoreLock(cfg.store):  # exclusive while the base is imported
                _import_base(job, console)
        with StoreLock(cfg.store, shared=True):
            base = open_store(cfg.store, StateCodecs.from_json)
            return _train(job, base, existing_run, console, trace)


def _base_memory(cfg: FinetuneConfig, skeleton, device):
    """The budgets of the base's streaming: the device budget less what the adapters take there
    (fp32 values, gradients, AdamW's moments: 16 B/param), which live outside the runtime's pool."""
    adapters = 16 * adapter_numel(skeleton, cfg.peft)
    budget = cfg.memory.gpu_mem_bytes
    if budget is None and device.type == "cuda":
        import torch

        budget = int(torch.cuda.mem_get_info(device)[0] * 0.9)
    if budget is None:
        return cfg.memory
    if budget <= adapters:
        raise ValueError(f"--gpu-mem {budget >> 20}MiB cannot hold the adapters and their AdamW state ({-(-adapters >> 20)}MiB); raise --gpu-mem or "
                         "lower --lora-r / --target-modules")
    return dataclasses.replace(cfg.memory, gpu_mem_bytes=budget - adapters)


def _import_base(job: Job, console) -> None:
    cfg = job.cfg
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    with Bar(TextColumn("importing the base {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
             transient=True) as bar:
        task = bar.add_task(job.source.describe(), total=job.config.num_hidden_layers + 2)
        import_model(job.source, cfg.store, cfg.state, seed=cfg.seed, weights_only=True, on_block=lambda _b, _n: bar.advance(task))


def _train(job: Job, base, existing_run: Optional[dict], console, trace) -> FinetuneResult:
    cfg, t0 = job.cfg, time.perf_counter()
    root = os.path.abspath(cfg.peft.run_dir)
    if existing_run is not None and run_dir.base_of(base)["weights"] != existing_run["base"]["weights"]:
        raise StoreError(f"the base store {base.root} changed since the LoRA run in {root} started (its weights' checksums differ); resume on "
                         "the base it trained on, or start a new run")
    if base.manifest["model"]["fingerprint"] != fingerprint_config(job.config.to_dict()):
        raise StoreError(f"the base store {base.root} holds another model ({base.manifest['model']['source']}); choose another --store")
    device = resolve_device(cfg.device)
    skeleton = Skeleton(job.config, linear=cfg.linear)
    dataset, eval_set = datasets_of(job)
    plan = plan_for_model(base, skeleton, device=device, batch=cfg.batch, memory=_base_memory(cfg, skeleton, device), frozen=True)
    adapters = Adapters(skeleton, cfg.peft, device, seed=cfg.seed, base_name=base.manifest["model"]["source"])
    if cfg.peft.init and existing_run is None:
        from safetensors.torch import load_file

        adapters.load(load_file(os.path.join(cfg.peft.init, "adapter_model.safetensors")), cfg.peft.init)
    if existing_run is not None:
        run_dir.collect_garbage(root, existing_run)
    base.unverified = frozenset() if cfg.verify_reads else frozenset({"weights"})
    rt = Runtime(base, skeleton, device=device, plan=plan, batch=cfg.batch, optim=cfg.optim, trace=trace, total_steps=cfg.steps, frozen=True)
    trainer = LoraTrainer(rt, adapters, optim=cfg.optim, max_grad_norm=cfg.max_grad_norm, root=root, base=run_dir.base_of(base),
                          manifest=existing_run)
    if existing_run is None:  # step 0 committed: the run is resumable from its first byte on
        trainer.manifest = run_dir.commit(root, 0, trainer._state(), trainer.base, {"run": job.record, "data_position": 0}, None)
    try:
        run_summary(summary_lines(job, base, rt, dataset, eval_set, root) + [f"adapters: {len(adapters.target_names)} linears, "
                    f"{adapters.numel() / 1e6:,.2f} M params (r {cfg.peft.r}, alpha {cfg.peft.alpha:g}); run {root}"], console)
        return loop.run(loop.Loop(cfg, job.record, trainer, dataset, eval_set, console), time.perf_counter() - t0)
    finally:
        rt.close()
        adapters.remove()
        loop.save_trace(trace, cfg.trace_dir)
