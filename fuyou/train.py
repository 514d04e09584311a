"""`finetune`: one writer per store, every check before the first byte, the import, then the steps.

Order matters for "nothing half-written": the store target is checked, then locked (a second
process is refused at once); the run's settings are resolved (a resumed run takes its store's,
refusing a changed one), the model, the data, the memory plan and the free disk are checked; only
then is anything written. `steps` is a total: the run trains until its store reaches that step.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Optional, Set

import torch

from .config import BUILTIN_DATA, BatchConfig, FinetuneConfig
from .data.dataset import TokenDataset, check_data_file
from .data.tokenizer import DEFAULT_CORPUS, load_tokenizer
from .dist.commit import reconcile
from .dist.group import RankGroup
from .dist.ranks import check_ranks, owners_of, rank_batch, rank_config, ranks_record, weights_only_blocks
from .memory import format_bytes
from .model.importer import TOKENIZER_FILES, import_model, model_info
from .model.skeleton import Skeleton
from .model.source import ModelSource
from .optim.state import StateCodecs
from . import loop
from .loop import FinetuneResult
from .metrics import tensorboard_writer
from .progress import run_summary
from .summary import summary_lines
from .resume import ResumeError, file_fingerprint, files_fingerprint, given_settings, record, resumed
from .step.memory_plan import MemoryPlan, disk_peak_bytes, plan_for_model
from .step.runtime import Runtime
from .store.lock import StoreLock
from .store.manifest import StoreError, is_store, new_manifest, read_manifest
from .store.paths import check_confined, check_store_target, clear_store
from .store.store import Store, open_store

@dataclass
class StoredModel:
    """A store's own copy of its model (config and tokenizer in <store>/model; no weights)."""

    config: object
    tokenizer_dir: str
    preset: Optional[str]

    @classmethod
    def of(cls, store: str, manifest: dict) -> "StoredModel":
        from transformers import AutoConfig

        source = manifest["model"]["source"]
        model_dir = os.path.join(store, "model")
        return cls(AutoConfig.from_pretrained(model_dir), model_dir, source.removeprefix("preset ") if source.startswith("preset ") else None)


@dataclass
class Job:
    """A run with every setting resolved and checked, before anything is written."""

    cfg: FinetuneConfig
    config: object  # the model's Hugging Face config
    tokenizer_dir: str
    source: Optional[ModelSource]  # where to import the weights from (None: resuming the store)
    existing: Optional[dict]  # the store's manifest when resuming
    record: dict  # the run's settings as the manifest keeps them
    data_path: str


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible; pass --device cpu")
    return dev


def _data_path(cfg: FinetuneConfig) -> str:
    if cfg.data == BUILTIN_DATA:
        return DEFAULT_CORPUS
    return os.path.abspath(cfg.data)


def new_job(cfg: FinetuneConfig, source) -> Job:
    """A new run's job; `source`: a ModelSource to import from, or the StoredModel of a base store."""
    if cfg.data is None:
        if source.preset is None:
            raise ValueError(f"--data is required with a local --model; pass the training data (.jsonl or .txt), or --data {BUILTIN_DATA} "
                             "for the bundled demo corpus")
        cfg = replace(cfg, data=BUILTIN_DATA)
    cfg = replace(cfg, optim=cfg.optim.with_default_lr(from_scratch=source.preset is not None))  # lr None: by the weights' origin
    data = _data_path(cfg)
    check_data_file(data)
    rec = record(cfg, data_fingerprint=file_fingerprint(data), tokenizer_fingerprint=files_fingerprint(source.tokenizer_dir, TOKENIZER_FILES))
    return Job(cfg, source.config, source.tokenizer_dir, source if isinstance(source, ModelSource) else None, None, rec, data)


def resumed_job(cfg: FinetuneConfig, given: Optional[Set[str]], manifest: dict, store: str) -> Job:
    """The job of `fuyou finetune --resume`: the store's recorded settings, the command line's
    changeable ones; the model's config and tokenizer are the store's own copies."""
    stored = manifest.get("train", {}).get("run", {})
    given = given_settings(cfg, given)
    same = set()
    if "model" in given and cfg.model != stored.get("settings", {}).get("model"):
        other = model_info(ModelSource(cfg.model), Skeleton(ModelSource(cfg.model).config))["fingerprint"]
        if other != manifest["model"]["fingerprint"]:
            raise ResumeError(f"--model {cfg.model} is not the model of the run in {store} ({manifest['model']['source']}); drop --model to "
                              "resume it, or start a new run (--overwrite, or another --store)")
        same.add("model")
    if "data" in given and cfg.data != stored.get("settings", {}).get("data") and os.path.isfile(_data_path(cfg)):
        if file_fingerprint(_data_path(cfg)) == stored.get("data_fingerprint"):
            same.add("data")  # the run's data, moved
    cfg = resumed(cfg, stored, given, store, same)
    data = _data_path(cfg)
    if not os.path.isfile(data):
        raise ValueError(f"the run's data {cfg.data} is gone; pass --data with the same file where it now lives")
    fingerprint = file_fingerprint(data)
    if fingerprint != stored.get("data_fingerprint") and not cfg.data_changed_ok:
        raise ResumeError(f"the data {data} changed since the run in {store} started (its content fingerprint differs); pass "
                          "--data-changed-ok to continue on it anyway (the data order then differs from an uninterrupted run)")
    model = StoredModel.of(store, manifest)
    rec = record(cfg, data_fingerprint=fingerprint, tokenizer_fingerprint=stored.get("tokenizer_fingerprint", ""))
    return Job(cfg, model.config, model.tokenizer_dir, None, manifest, rec, data)


def prepare(cfg: FinetuneConfig, given: Optional[Set[str]] = None) -> Job:
    """Resolve and check every setting of a run, reading but never writing its store. `given`: the
    settings the command line names (see resume.resumed)."""
    path = os.path.abspath(cfg.store)
    check_store_target(path)
    existing = read_existing(path) if is_store(path) else None
    if cfg.resume and existing is None:
        raise StoreError(f"--resume: {path} is not a fuyou store yet; drop --resume to start a new run there")
    if cfg.resume:
        return resumed_job(cfg, given, existing, path)
    source = ModelSource(cfg.model)
    if existing is not None and not cfg.overwrite:
        if model_info(source, Skeleton(source.config))["fingerprint"] != existing["model"]["fingerprint"]:
            raise StoreError(f"store {path} belongs to another model ({existing['model']['source']}); choose another --store, or --overwrite to replace it")
        raise StoreError(f"store {path} already holds step {existing['step']} of this model; pass --resume to continue it or --overwrite to start over")
    return new_job(cfg, source)


def read_existing(path: str) -> dict:
    """An existing store's manifest, once the store is known to be confined, well-formed and whole
    (read only: nothing of it is touched)."""
    check_confined(path)
    manifest = read_manifest(path)
    try:
        state = StateCodecs.from_json(manifest["state"])
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: the manifest's state entry names no codecs this fuyou has ({exc}); the store is damaged") from None
    Store(path, manifest, state).check_files()
    return manifest


@dataclass
class CheckedRun:
    """A run after every check, before its first byte: the job, its model, data and memory plan."""

    job: Job
    device: torch.device
    skeleton: Skeleton
    datasets: tuple  # (training rows, validation rows or None)
    plan: MemoryPlan
    dry: Store  # the store as it will be (nothing of it written yet)
    batch: BatchConfig  # this process's share of a step (the whole batch unless ranks share it)


def finetune(cfg: FinetuneConfig, *, given: Optional[Set[str]] = None, console=None, trace=None, group: Optional[RankGroup] = None) -> FinetuneResult:
    """`group`: the ranks of a data-parallel run (fuyou.dist; torchrun launches one process per rank)."""
    from rich.console import Console

    if cfg.peft.method is not None:
        raise ValueError("a --peft run trains adapters on a frozen base: call fuyou.lora.job.finetune_lora (the command does)")

    from .store.backends import set_default_backend

    set_default_backend(cfg.io_backend)
    console = console or Console(stderr=True)
    if group is not None:
        cfg = group.agree(lambda: rank_config(cfg, group))
    with _locked(cfg.store, group):
        if group is not None:
            reconcile(cfg.store, group, StateCodecs.from_json)  # a step some rank committed before a crash: every rank has it
        run = _agreed(group, lambda: check_run(cfg, given, group))
        cfg, job = run.job.cfg, run.job
        if job.existing is not None and job.existing["step"] >= cfg.steps:
            return _finished(cfg, job.existing, run.dry, console)
        t0 = time.perf_counter()
        store = _agreed(group, lambda: _open_or_import(job, console, weights_only_blocks(job.record, group)))
        import_s = time.perf_counter() - t0
        store.unverified = frozenset() if cfg.verify_reads else frozenset({"weights"})  # the optimizer's states are always checked
        rt = _agreed(group, lambda: Runtime(store, run.skeleton, device=run.device, plan=run.plan, batch=run.batch, optim=cfg.optim, trace=trace,
                                            max_grad_norm=cfg.max_grad_norm, disk_mode=cfg.disk_mode, total_steps=cfg.steps, group=group,
                                            owners=owners_of(job.record)))
        dataset, eval_set = run.datasets
        try:
            run_summary(summary_lines(job, store, rt, dataset, eval_set), console)
            trainer = loop.StoreTrainer(rt, store, group)
            return loop.run(loop.Loop(cfg, job.record, trainer, dataset, eval_set, console), import_s)
        finally:
            rt.close()
            loop.save_trace(trace, cfg.trace_dir)


def _agreed(group: Optional[RankGroup], fn):
    """fn() here; with ranks, on every rank, failing on all when it fails on one (RankGroup.agree)."""
    return fn() if group is None else group.agree(fn)


@contextlib.contextmanager
def _locked(store: str, group: Optional[RankGroup]):
    """The store checked as a target, then locked (with ranks: every rank's, or none)."""
    lock = StoreLock(store)

    def take():
        check_store_target(os.path.abspath(store))  # before the lock file is made in it
        lock.__enter__()

    try:
        _agreed(group, take)
        yield lock
    finally:
        lock.__exit__(None, None, None)  # a no-op when this rank never took it


def check_run(cfg: FinetuneConfig, given: Optional[Set[str]], group: Optional[RankGroup] = None) -> CheckedRun:
    """Resolve and check the run (settings, model, data, memory plan, free disk), writing nothing."""
    job = prepare(cfg, given)
    cfg = job.cfg
    stored_ranks = job.existing["train"]["run"].get("ranks") if job.existing is not None else None
    if job.existing is not None:
        check_ranks(stored_ranks, group, cfg.store)
    device = resolve_device(cfg.device)
    skeleton = Skeleton(job.config, linear=cfg.linear)
    datasets = datasets_of(job)
    # The run's memory plan, made on the store's layout before anything is written (a budget that
    # cannot hold one block is refused here), and handed to the runtime.
    state = StateCodecs(cfg.state)
    if stored_ranks is not None or group is not None:  # which rank updates which block, as the run began
        job.record["ranks"] = stored_ranks or ranks_record(skeleton.manifest_blocks(), group)
    manifest = job.existing or new_manifest(model_info(job.source, skeleton), state, skeleton.manifest_blocks(),
                                            weights_only=weights_only_blocks(job.record, group))
    dry = Store(cfg.store, manifest, state)
    batch = rank_batch(cfg.batch, group)
    plan = plan_for_model(dry, skeleton, device=device, batch=batch, memory=cfg.memory)
    _check_free_disk(dry, plan, cfg, resuming=job.existing is not None)
    if cfg.output.tensorboard:
        tensorboard_writer()  # refused before the import if the package is missing
    return CheckedRun(job, device, skeleton, datasets, plan, dry, batch)


def datasets_of(job: Job) -> tuple:
    """(training rows, validation rows or None), the tokenizer and the model agreeing."""
    cfg, config = job.cfg, job.config
    tokenizer = load_tokenizer(job.tokenizer_dir)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {config.vocab_size}; use the model's own tokenizer")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and cfg.batch.seq_len > max_positions:
        raise ValueError(f"--seq-len {cfg.batch.seq_len} is beyond the model's {max_positions} positions; pass --seq-len {max_positions} or less")
    dataset = TokenDataset(job.data_path, tokenizer, cfg.batch.seq_len, seed=cfg.seed)
    if cfg.eval.data is not None:
        return dataset, TokenDataset(cfg.eval.data, tokenizer, cfg.batch.seq_len, seed=cfg.seed)
    if cfg.eval.split:
        return dataset.split(cfg.eval.split)
    return dataset, None


def _finished(cfg: FinetuneConfig, manifest: dict, store: Store, console) -> FinetuneResult:
    from rich.console import Console

    (console or Console(stderr=True)).print(
        f"the run in {store.root} is at step {manifest['step']}, its target (--steps {cfg.steps}): nothing to do; "
        "pass a larger --steps to train further", highlight=False)
    return FinetuneResult([], store.root, store.numel(), 0, {}, 0.0, cfg.steps)


def _open_or_import(job: Job, console, weights_only_blocks=()) -> Store:
    """The run's store: opened, or imported (`weights_only_blocks`: another rank's store updates them)."""
    cfg = job.cfg
    if job.existing is not None:
        return open_store(cfg.store, StateCodecs.from_json)
    if cfg.overwrite and is_store(cfg.store):
        clear_store(cfg.store)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    n_blocks = job.config.num_hidden_layers + 2
    with Bar(TextColumn("importing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(job.source.describe(), total=n_blocks)
        return import_model(job.source, cfg.store, cfg.state, seed=cfg.seed, train={"run": job.record, "data_position": 0},
                            on_block=lambda _b, _n: bar.advance(task), weights_only_blocks=weights_only_blocks)


def _check_free_disk(store: Store, plan: MemoryPlan, cfg: FinetuneConfig, *, resuming: bool) -> None:
    """Refuse a run whose peak disk footprint does not fit the free space of the store's disk."""
    peak = disk_peak_bytes(store, plan, disk_mode=cfg.disk_mode, keeps_grads=cfg.max_grad_norm is not None)
    have = shutil.disk_usage(_existing_parent(store.root)).free + (store.state_bytes() if resuming or cfg.overwrite else 0)
    if peak > have:
        raise StoreError(f"not enough free disk for the run at {store.root}: {format_bytes(have)} free, {format_bytes(peak)} needed at the peak "
                         f"of a step ({cfg.disk_mode} disk mode); free space there, choose another --store"
                         + (", or use --disk-mode lean" if cfg.disk_mode == "safe" else ""))


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path
