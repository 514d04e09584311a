"""`finetune`: validate everything, import the model into the store if needed, then run the steps.

Order matters for "nothing half-written": the model, the data, the store target and the memory plan
are all checked before the first byte is written to the store.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import psutil
import torch

from .config import BatchConfig, MemoryConfig, OptimConfig
from .data.dataset import TokenDataset
from .data.tokenizer import DEFAULT_CORPUS, load_tokenizer
from .memory import format_bytes
from .model.importer import import_model, model_info
from .model.skeleton import Skeleton
from .model.source import DEFAULT_PRESET, ModelSource
from .optim.state import StateConfig
from .step.memory_plan import plan_for_model
from .step.runtime import Runtime, StepResult
from .store.store import Store, StoreError, check_store_target, is_store, new_manifest, open_store, read_manifest


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything `fuyou finetune` needs (the CLI fills it from its flags)."""

    model: str = DEFAULT_PRESET  # HF model directory, or a preset name
    data: Optional[str] = None  # .jsonl / .txt; None = the bundled corpus
    store: str = "fuyou-store"  # store directory (created)
    steps: int = 60
    seed: int = 0
    resume: bool = False  # continue an existing store of this model
    overwrite: bool = False  # delete an existing fuyou store at --store first
    device: Optional[str] = None  # "cuda", "cpu"; None = cuda when present
    io_backend: str = "auto"
    trace_dir: Optional[str] = None
    max_grad_norm: Optional[float] = None  # clip the global gradient norm (exact, under overlap)
    verify_reads: bool = True  # check every block read against its CRC-32
    disk_mode: str = "safe"  # safe: old states kept until commit (exact clip/skip, up to 2x disk); lean: per-block journal (~1.25x)
    linear: Optional[str] = None  # low-precision recipe for decoder-layer linears (fp8-blockwise, mxfp4, nvfp4)
    state: StateConfig = field(default_factory=StateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("--steps must be >= 1")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pass one")


@dataclass
class FinetuneResult:
    steps: List[StepResult]
    store: str
    numel: int
    peak_rss_bytes: int
    pool_peaks: dict
    import_seconds: float

    @property
    def first_loss(self) -> float:
        return self.steps[0].loss

    @property
    def last_loss(self) -> float:
        return self.steps[-1].loss


class StoreIOError(OSError):
    """A disk error during a step; the message names the store and how to resume."""


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the step in flight (a second SIGINT interrupts it;
    the store stays at its last committed step either way)."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible; pass --device cpu")
    return dev


def prepare_store(cfg: FinetuneConfig, source: ModelSource) -> tuple:
    """Check the store target against the model; return (existing store manifest or None)."""
    path = os.path.abspath(cfg.store)
    check_store_target(path)
    if not is_store(path):
        if cfg.resume:
            raise StoreError(f"--resume: {path} is not a fuyou store yet; drop --resume to start a new run there")
        return None
    manifest = read_manifest(path)
    want = model_info(source, Skeleton(source.config))["fingerprint"]
    if manifest["model"]["fingerprint"] != want and not cfg.overwrite:
        raise StoreError(
            f"store {path} belongs to another model ({manifest['model']['source']}); choose another --store, or --overwrite to replace it"
        )
    if cfg.overwrite:
        return None
    if not cfg.resume:
        raise StoreError(f"store {path} already holds step {manifest['step']} of this model; pass --resume to continue it or --overwrite to start over")
    if manifest["state"] != cfg.state.to_json():
        raise StoreError(f"store {path} keeps state as {manifest['state']}, not {cfg.state.to_json()}; resume with the store's settings")
    return manifest


def finetune(cfg: FinetuneConfig, *, console=None, trace=None) -> FinetuneResult:
    from .store.backends import set_default_backend

    set_default_backend(cfg.io_backend)
    device = resolve_device(cfg.device)
    source = ModelSource(cfg.model)
    skeleton = Skeleton(source.config, linear=cfg.linear)
    tokenizer = load_tokenizer(source.tokenizer_dir)
    if len(tokenizer) > source.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {source.config.vocab_size}; use the model's own tokenizer")
    dataset = TokenDataset(cfg.data or DEFAULT_CORPUS, tokenizer, cfg.batch.seq_len, seed=cfg.seed)
    existing = prepare_store(cfg, source)
    # The run's memory plan, made on the store's layout before anything is written (a budget that
    # cannot hold one block is refused here), and handed to the runtime.
    dry = Store(cfg.store, existing or new_manifest(model_info(source, skeleton), cfg.state, skeleton.manifest_blocks()))
    plan = plan_for_model(dry, skeleton, device=device, batch=cfg.batch, memory=cfg.memory)

    t0 = time.perf_counter()
    if existing is None:
        if cfg.overwrite and is_store(cfg.store):
            shutil.rmtree(cfg.store)
        store = _import(source, cfg, console)
    else:
        store = open_store(cfg.store)
    import_s = time.perf_counter() - t0
    store.verify = cfg.verify_reads
    rt = Runtime(store, skeleton, device=device, plan=plan, batch=cfg.batch, optim=cfg.optim, trace=trace, max_grad_norm=cfg.max_grad_norm, disk_mode=cfg.disk_mode)
    results: List[StepResult] = []
    proc = psutil.Process()
    peak_rss = proc.memory_info().rss
    position = int(store.manifest.get("train", {}).get("data_position", 0))
    stop = _StopFlag()
    try:
        with stop, _Progress(console, cfg.steps, store.numel()) as bar:
            bar.note(skeleton.describe())
            for _ in range(cfg.steps):
                if stop.requested:
                    bar.note(f"stopping on {stop.requested} after step {store.step}; the store is resumable with --resume")
                    break
                batch = dataset.batch(position, cfg.batch.batch_size)
                position += cfg.batch.batch_size
                meta = {
                    "data_position": position,  # rows consumed: the data order is a function of (seed, position)
                    "seed": cfg.seed,
                    "data": os.path.abspath(cfg.data or DEFAULT_CORPUS),
                    "lr_schedule": {"lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps},  # position = the step
                    "rng": "none consumed by a step (dropout is off; the data order is seeded)",
                }
                try:
                    res = rt.step(batch, train_meta=meta)
                except OSError as exc:
                    raise StoreIOError(
                        f"{exc}; the store {store.root} still holds step {store.step}: fix the cause (free space, check the disk), then rerun with --resume"
                    ) from exc
                if res.status == "skipped":
                    bar.note(f"warning: non-finite gradient at step {res.step + 1}; skipped the batch, state unchanged")
                results.append(res)
                peak_rss = max(peak_rss, proc.memory_info().rss)
                bar.update(res, peak_rss)
    finally:
        rt.close()
        if trace is not None and cfg.trace_dir:
            os.makedirs(cfg.trace_dir, exist_ok=True)
            trace.save_chrome(os.path.join(cfg.trace_dir, "trace.json"))
    return FinetuneResult(results, os.path.abspath(cfg.store), store.numel(), peak_rss, {p.name: p.report() for p in (rt.cpu_pool, rt.dev_pool, rt.cache_pool)}, import_s)


def _import(source: ModelSource, cfg: FinetuneConfig, console) -> Store:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n_blocks = source.config.num_hidden_layers + 2
    with Progress(TextColumn("importing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task(source.describe(), total=n_blocks)
        store = import_model(source, cfg.store, cfg.state, seed=cfg.seed, on_block=lambda _b, _n: prog.advance(task))
    return store


class _Progress:
    """A rich progress bar (step, loss, tokens/s, GB read/written, RSS); plain lines when not a TTY."""

    def __init__(self, console, total: int, numel: int):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.total, self.numel = total, numel
        self.read = self.written = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self.tokens = 0
        self._prog = None

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.console.is_terminal:
            self._prog = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._prog.__enter__()
            self._task = self._prog.add_task("train", total=self.total, info="")
        return self

    def update(self, res: StepResult, rss: int) -> None:
        self.done += 1
        self.read += res.bytes_read
        self.written += res.bytes_written
        self.tokens += res.tokens
        tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        info = (
            f"loss {res.loss:.4f}  {tps:,.0f} tok/s  read {self.read / 1e9:.2f} GB  written {self.written / 1e9:.2f} GB  "
            f"{(res.bytes_read + res.bytes_written) / max(self.numel, 1):.1f} B/param/step  RSS {format_bytes(rss)}"
        )
        if self._prog is not None:
            self._prog.update(self._task, completed=self.done, info=info)
        elif self.done == 1 or self.done == self.total or self.done % max(1, self.total // 10) == 0:
            self.console.print(f"step {res.step} ({self.done}/{self.total})  {info}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def __exit__(self, *exc):
        if self._prog is not None:
            self._prog.__exit__(*exc)
        return False


def print_summary(res: FinetuneResult, console=None) -> None:
    from rich.console import Console

    console = console or Console(stderr=True)
    if not res.steps:
        console.print(f"no step ran; store {res.store}", highlight=False)
        return
    last = res.steps[-1]
    per_step = sorted(s.seconds for s in res.steps)[len(res.steps) // 2]
    console.print(
        f"done: {len(res.steps)} steps, loss {res.first_loss:.4f} -> {res.last_loss:.4f}; median step {per_step:.3f} s; "
        f"store traffic {(last.bytes_read + last.bytes_written) / max(res.numel, 1):.1f} B/param/step "
        f"(read {last.bytes_read / 1e6:.1f} MB, written {last.bytes_written / 1e6:.1f} MB); peak RSS {format_bytes(res.peak_rss_bytes)}; "
        + "; ".join(f"{k} pool peak {format_bytes(v['peak_bytes'])} of {format_bytes(v['capacity_bytes'])}" for k, v in res.pool_peaks.items())
        + f"; store {res.store} at step {last.step}",
        highlight=False,
    )
    sys.stderr.flush()
