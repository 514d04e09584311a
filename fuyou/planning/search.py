"""Plan a run before running it: from a model's config alone (no weights), the batch, the codecs and
the memory budgets, choose the runtime's knobs and predict the step.

Knobs the runtime has today, searched here: prefetch depth (weight staging slots = depth + 1), the
number of micro-batches (divisors of the batch size) and optimizer slots (1..MAX_OPT_SLOTS). Each
candidate is realised exactly as the runtime would: `plan_memory` (the runtime's own slot planner)
is called with the budgets the candidate hands to the runtime, and the step graph is the runtime's
own (`build_step_graph` over `step_spec`), so what is predicted is what will run.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from scheduler.costmodel import Rates, predict
from scheduler.planner import Candidate, Choice, choose

from ..config import BatchConfig, MemoryConfig, PeftConfig, StateConfig
from .settings import PlanConfig
from ..dist.partition import assign_owners, block_sizes
from ..optim.state import WEIGHT_DTYPES, StateCodecs
from .rates import load_rates, rate_bounds
from ..step.graph import LANES, build_redo_graph, build_step_graph, bytes_per_step
from ..step.spec import StepSpec, assign_opt_slots, model_consumers, step_spec
from ..step.memory_plan import MAX_GRAD_SLOTS, MAX_OPT_SLOTS, BudgetError, MemoryPlan, compute_dtype_for, disk_peak_bytes, plan_for_model
from ..step.slot_sizes import slot_layouts

UNCONSTRAINED = 1 << 62  # a budget no plan reaches (used to size slots without a limit)
# Knobs the memory plan sets by rule from the budgets, for every candidate alike (not searched).
RULE_KNOBS = (
    ("activation placement", "block inputs stay on the device; when they do not fit, the earliest layers' go to host memory, then to the "
     "SSD when the host is full, then every other upper layer's is recomputed from the layer below"),
    ("block cache", "whole blocks in forward order while they fit --cache-mem"),
)


@dataclass
class ModelShape:
    """A model's layout from its config alone: skeleton, dry store (no files), consumers."""

    hf_config: object
    skeleton: object
    store: object
    cons: list
    tied: bool
    numel: int
    adapter_numel: int = 0  # a LoRA run: the adapters' parameters (on the device, trained there)

    @property
    def frozen(self) -> bool:
        return self.store.state.weights_only

    def adapter_device_bytes(self) -> int:
        """The adapters on the device: fp32 values, gradients and AdamW's two moments."""
        return 16 * self.adapter_numel


def load_model_config(model: str):
    """The HF config of a preset or a model directory; weights are not needed."""
    from ..model.source import PRESETS, ModelSource

    if model in PRESETS:
        return ModelSource(model).config
    path = os.path.abspath(model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {model}: neither a preset ({', '.join(PRESETS)}) nor a directory holding config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"{path}/config.json cannot be read as a transformers config ({exc}); check the file") from None


def model_shape(hf_config, state: StateConfig, ranks: int = 1, peft: Optional[PeftConfig] = None) -> ModelShape:
    """`ranks` > 1: the store of the rank that updates the most parameters (the others hold fewer).
    `peft` (a LoRA run): the frozen base's store (weights alone) and the adapters' size."""
    from ..model.skeleton import Skeleton
    from ..store.store import Store
    from ..store.manifest import new_manifest

    sk = Skeleton(hf_config)
    info = {"source": "plan", "architecture": type(sk.model).__name__, "fingerprint": "", "numel": sk.numel()}
    blocks = sk.manifest_blocks()
    sizes = block_sizes(blocks)
    owners = assign_owners(sizes, ranks)
    load = {r: sum(n for b, n in sizes if owners[b] == r) for r in range(ranks)}
    busiest = max(range(ranks), key=lambda r: (load[r], -r))
    frozen = peft is not None and peft.method is not None
    codecs = StateCodecs(state, weights_only=frozen)
    manifest = new_manifest(info, codecs, blocks, weights_only=[b for b, r in owners.items() if r != busiest])
    store = Store(os.path.join(os.sep, "nonexistent-fuyou-plan"), manifest, codecs)
    adapters = 0
    if frozen:
        from ..lora.adapters import adapter_numel

        adapters = adapter_numel(sk, peft)
    return ModelShape(hf_config, sk, store, model_consumers(store, sk, frozen=frozen), sk.tied, sk.numel(), adapters)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _plan_memory(shape: ModelShape, cfg: PlanConfig, batch: BatchConfig, depth: int, cpu: int, gpu: int):
    """The runtime's memory plan of a candidate (the run's recompute mode and block cache)."""
    memory = MemoryConfig(gpu_mem_bytes=gpu, cpu_mem_bytes=cpu, prefetch_depth=depth, recompute=cfg.memory.recompute, cache_mem_bytes=cfg.cache_mem_bytes)
    return run_memory_plan(shape, cfg, batch, memory)


def run_memory_plan(shape: ModelShape, cfg: PlanConfig, batch: BatchConfig, memory: MemoryConfig) -> MemoryPlan:
    """The memory plan the runtime makes for a run with these settings (`cfg`: device, codecs)."""
    device = torch.device(cfg.device)
    return plan_for_model(shape.store, shape.skeleton, device=device, batch=batch, memory=memory,
                          compute_dtype=compute_dtype_for(device, WEIGHT_DTYPES[cfg.state.weights]), frozen=shape.frozen)


def planned_graph(shape: ModelShape, spec: StepSpec, micro_batches: int):
    """The step graph the cost model times: the runtime's, each compute task's calls counted (one
    per micro-batch), then the commit after it (the manifest switch), and the deletion of the
    files the previous step's commit superseded, which runs during this step on a thread of its own
    (store/deleter.py)."""
    g = build_step_graph(spec)
    for t in g.tasks:
        if t.kind == "compute":
            t.meta["calls"] = micro_batches
    n_files = 0 if shape.frozen else sum(len(lay.kinds) for lay in shape.store.layouts.values())
    # What a commit supersedes is what the step wrote anew, as large (in lean mode the master and
    # moments go during the step; the total is the same).
    freed = bytes_per_step(g.tasks)["ssd written"]
    g.add("delete", "delete", "delete", lambda: None, [], files=n_files, freed_bytes=freed)
    g.add("commit", "commit", "commit", lambda: None, [t for t in g.tasks if t.kind in ("write", "compute")])
    return g


def run_step_spec(shape: ModelShape, cfg: PlanConfig, batch: BatchConfig, plan: MemoryPlan) -> StepSpec:
    """The step the runtime runs with that memory plan: what its graph is built from."""
    owner = assign_opt_slots(shape.cons, plan.edge_blocks, plan.opt_slots) if plan.opt_slots else {}
    return step_spec(shape.store, shape.cons, plan, owner, shape.skeleton, batch, ranks=cfg.ranks, keeps_grads=cfg.job.max_grad_norm is not None)


def slot_sizes(shape: ModelShape, cfg: PlanConfig, micro: int, depth: int) -> Optional[MemoryPlan]:
    """The plan of (micro, depth) without budgets: every slot's size, and the most slots it would
    use; None when even that cannot be built. Shared by the candidates that differ in optimizer slots."""
    batch = BatchConfig(batch_size=cfg.batch.batch_size, micro_batches=micro, seq_len=cfg.batch.seq_len)
    try:
        return _plan_memory(shape, cfg, batch, depth, UNCONSTRAINED, UNCONSTRAINED)
    except BudgetError:
        return None


def ssd_need_bytes(shape: ModelShape, cfg: PlanConfig, plan: MemoryPlan) -> int:
    """Store capacity the run needs at the peak of a step (the run checks the same before it starts)."""
    return disk_peak_bytes(shape.store, plan, disk_mode=cfg.job.disk_mode, keeps_grads=cfg.job.max_grad_norm is not None, frozen=shape.frozen)


def candidate(shape: ModelShape, cfg: PlanConfig, micro: int, depth: int, opt_slots: int, sizes: Optional[MemoryPlan] = None,
              layout: Optional[dict] = None) -> Optional[Candidate]:
    """The plan (micro, depth, opt_slots, slot layout) as the runtime realises it, or None if the
    runtime's slot planner would turn those budgets into another plan (which is enumerated on its
    own). `sizes`: slot_sizes(shape, cfg, micro, depth), when the caller has it already; `layout`:
    one of slot_sizes.slot_layouts (None: the one the runtime takes without a budget)."""
    batch = BatchConfig(batch_size=cfg.batch.batch_size, micro_batches=micro, seq_len=cfg.batch.seq_len)
    sizes = sizes or slot_sizes(shape, cfg, micro, depth)
    if sizes is None:
        return None
    if layout is not None:
        sizes = dataclasses.replace(sizes, **layout)
    w = depth + 1
    cpu = dataclasses.replace(sizes, weight_slots=w, opt_slots=opt_slots, grad_slots=MAX_GRAD_SLOTS).slot_bytes()
    full_dev = sizes.device_bytes()  # with depth + 1 device slots (or none when no copy is needed)
    adapters = shape.adapter_device_bytes()  # outside the runtime's pool: its budget is what they leave
    gpu = full_dev if cfg.gpu_mem_bytes is None else min(full_dev, max(cfg.gpu_mem_bytes - adapters, 1))
    try:
        plan = _plan_memory(shape, cfg, batch, depth, cpu, gpu)
    except BudgetError:
        # Does not fit the device budget at all: keep the sizes, the planner reports the need.
        plan = dataclasses.replace(sizes, weight_slots=w, opt_slots=opt_slots)
        gpu = full_dev
    if (plan.weight_slots, plan.opt_slots, plan.edge_blocks) != (w, opt_slots, sizes.edge_blocks):
        return None
    spec = run_step_spec(shape, cfg, batch, plan)

    def build():
        return planned_graph(shape, spec, micro)

    knobs = {"prefetch_depth": depth, "micro_batches": micro, "opt_slots": plan.opt_slots, "weight_slots": plan.weight_slots, "device_slots": plan.device_slots,
             "edge_slot": "+".join(plan.edge_blocks) or "none"}
    memory = {"gpu": plan.device_bytes() + shape.adapter_device_bytes(), "cpu": plan.cpu_bytes(), "ssd": ssd_need_bytes(shape, cfg, plan), "cache": plan.cache_bytes}
    pref = (micro != cfg.batch.micro_batches, depth)
    # The run's batch: every rank's rows (cfg.batch here is one rank's share, see make_plan).
    run_batch = BatchConfig(batch_size=batch.batch_size * cfg.ranks, micro_batches=micro * cfg.ranks, seq_len=batch.seq_len)
    run_cfg = {"memory": MemoryConfig(gpu_mem_bytes=max(gpu, 1) + adapters, cpu_mem_bytes=cpu, prefetch_depth=depth, cache_mem_bytes=cfg.cache_mem_bytes,
                                      recompute=cfg.memory.recompute), "batch": run_batch}
    return Candidate(knobs, memory, build, pref, {"plan": plan, "spec": spec, "run": run_cfg})


@dataclass
class RunPlan:
    """A planned run: the planner's result and what the user asked."""

    cfg: PlanConfig
    shape: ModelShape
    rates: Rates
    rates_source: str
    result: Choice
    # The chosen plan's step with every probed rate at the slow and at the fast end of its spread.
    range_s: Optional[Tuple[float, float]] = None
    # ... and a clipped step: the step, then its optimizer pass redone (when the run clips).
    clipped_s: Optional[float] = None

    @property
    def fits(self) -> bool:
        return self.result.best is not None

    def memory_config(self) -> MemoryConfig:
        return self.result.best.candidate.extra["run"]["memory"]

    def batch_config(self) -> BatchConfig:
        return self.result.best.candidate.extra["run"]["batch"]


def make_plan(cfg: PlanConfig, rates: Rates, rates_source: str = "given", shape: Optional[ModelShape] = None,
              spread: Optional[dict] = None) -> RunPlan:
    """Enumerate, predict and choose (see module docstring). With ranks, one rank's share is
    planned: its rows in its micro-batches, its store; the plan's batch is the run's again.
    `spread`: the probe's {rate: [slow, fast]}, for the range of the chosen plan's step."""
    asked = cfg
    if cfg.ranks > 1:
        b = cfg.batch
        rows = b.batch_size // cfg.ranks
        micro = max(d for d in _divisors(rows) if d <= max(b.micro_batches // cfg.ranks, 1))
        cfg = dataclasses.replace(cfg, batch=BatchConfig(batch_size=rows, micro_batches=micro, seq_len=b.seq_len))
    shape = shape or model_shape(load_model_config(cfg.model), cfg.state, cfg.ranks, cfg.peft)
    micros = _divisors(cfg.batch.batch_size) if cfg.search_micro_batches else [cfg.batch.micro_batches]
    opt_slots = [0] if shape.frozen else list(range(1, MAX_OPT_SLOTS + 1))  # a frozen base has no optimizer slot
    layouts = slot_layouts(shape.store, shape.tied, shape.frozen)
    # Depth 0, one optimizer slot, in the layout the runtime takes for its budgets.
    naive = next((c for c in (candidate(shape, cfg, cfg.batch.micro_batches, 0, opt_slots[0], layout=lay) for lay in layouts) if c is not None), None)
    cands = [naive] if naive is not None else []
    naive_edge = naive.extra["plan"].edge_blocks if naive is not None else None
    for micro in micros:
        for depth in range(cfg.max_prefetch_depth + 1):
            sizes = slot_sizes(shape, cfg, micro, depth)
            for k in opt_slots:
                for layout in layouts:
                    if sizes is None or ((micro, depth, k) == (cfg.batch.micro_batches, 0, opt_slots[0]) and layout["edge_blocks"] == naive_edge):
                        continue
                    c = candidate(shape, cfg, micro, depth, k, sizes, layout)
                    if c is not None:
                        cands.append(c)
    if not cands:
        raise ValueError(f"{cfg.model}: no plan can be built for batch {cfg.batch.batch_size} x seq {cfg.batch.seq_len}; check the model config")
    budgets = {"gpu": cfg.gpu_mem_bytes, "cpu": cfg.cpu_mem_bytes, "ssd": cfg.ssd_bytes}
    for_codec = lambda r: r.for_codec(cfg.state.states, cfg.state.master, cfg.state.weights)  # noqa: E731 - the optimizer rate of the planned codec
    probed, rates = rates, for_codec(rates)
    result = choose(cands, budgets, rates, naive=naive, lanes=LANES)
    plan = RunPlan(asked, shape, rates, rates_source, result)
    if result.best is not None:
        graph = result.best.candidate.build()
        if spread:  # each bound of the probed rates, taken for the codec as the plan's rates are
            plan.range_s = tuple(predict(graph, for_codec(r), LANES).step_s for r in rate_bounds(probed, spread)[::-1])
        if cfg.job.max_grad_norm is not None:
            plan.clipped_s = result.best.step_s + redo_s(result.best.candidate.extra["spec"], rates)
    return plan


def redo_s(spec: StepSpec, rates: Rates) -> float:
    """Seconds a clipped step adds to its step: the optimizer pass redone from the old states."""
    return predict(build_redo_graph(spec), rates, LANES).step_s


def auto_memory_config(cfg: PlanConfig, rates: Optional[Rates] = None) -> tuple:
    """(MemoryConfig, BatchConfig) of the planned run, for `fuyou finetune --plan auto`.

    Budgets left None get the runtime's own defaults on this machine (host: half the RAM; CUDA: 90%
    of the free device memory). Raises ValueError naming the minimum budgets when nothing fits."""
    import psutil

    if rates is None:
        rates, _src = load_rates(cfg.device)
    if cfg.cpu_mem_bytes is None:
        cfg = dataclasses.replace(cfg, cpu_mem_bytes=psutil.virtual_memory().total // 2)
    if cfg.gpu_mem_bytes is None and cfg.device == "cuda":
        cfg = dataclasses.replace(cfg, gpu_mem_bytes=int(torch.cuda.mem_get_info()[0] * 0.9))
    plan = make_plan(cfg, rates)
    if not plan.fits:
        raise ValueError("no plan fits the budgets; " + minimum_message(plan))
    return plan.memory_config(), plan.batch_config()


def minimum_message(plan: RunPlan) -> str:
    from ..memory import format_bytes

    need = plan.result.minimum_budgets or {}
    flag = {"gpu": "--gpu-mem", "cpu": "--cpu-mem", "ssd": "--ssd-mem"}
    parts = [f"{flag[t]} {_ceil_mib(v)}" for t, v in need.items() if t in flag]
    knobs = plan.result.minimum_candidate.knobs if plan.result.minimum_candidate else {}
    extra = f" (with --micro-batches {knobs['micro_batches']})" if knobs else ""
    return "the smallest budgets that fit are " + ", ".join(parts) + extra + f" [{', '.join(format_bytes(v) for v in need.values())}]"


def _ceil_mib(n: int) -> str:
    return f"{(int(n) + (1 << 20) - 1) >> 20}MiB"
