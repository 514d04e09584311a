"""Memory plan of a run: how many weight and optimizer slots fit the budgets, or the minimum that would.

Slots are fixed-size buffers reused every step (see runtime.py):
  - weight staging slots (host): one consumer's weights as stored (a block, or head + tied embedding);
  - device weight slots: the same, decoded to the compute dtype (only when the device is not the
    host or the stored dtype is not the compute dtype);
  - optimizer slots (host): a block's master, moments and new weights, cycled in backward order;
  - gradient slots (host): a block's fp32 gradient, cycled alike;
  - the edge slot (host): an optimizer and a gradient slot of their own for the embedding and the
    untied head (or a tied embedding), sized for them, so the cycled slots are sized for the
    largest other block (see plan_memory);
  - activations (device): every block input of every micro-batch, plus one output gradient each;
  - compute workspace (device): an estimate of what a block's recompute and backward allocate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import psutil
import torch

from ..config import BatchConfig, MemoryConfig
from ..memory import format_bytes
from ..store.directio import aligned_bytes
from ..store.store import Store
from .slot_sizes import layout_bytes, opt_region_offsets, slot_layouts
from .spec import Consumer, model_consumers

MAX_OPT_SLOTS = 3  # more only adds optimizer run-ahead the backward cannot use (one block per backward)
MAX_GRAD_SLOTS = 2  # one filled by the backward while the optimizer consumes the other
# Offloaded block inputs on the device at once: in the forward, layer i's input on its way out while
# layer i+1 reads its own and writes the next (the step graph makes layer i+2 wait for that copy);
# in the backward, the input in use and the one coming back.
ACT_OFFLOAD_WINDOW = 3


class BudgetError(ValueError):
    """The budgets cannot hold one block plus its buffers (the message gives the minimum)."""


@dataclass
class MemoryPlan:
    weight_slots: int
    device_slots: int
    opt_slots: int
    stage_slot_bytes: int
    device_slot_bytes: int
    opt_slot_bytes: int
    act_bytes: int
    n_acts: int
    workspace_bytes: int
    cpu_budget_bytes: int
    device_budget_bytes: int
    kept_bytes: int = 0  # activations kept from the forward for the backward (0: the backward recomputes)
    grad_slots: int = 1  # fp32 gradient buffers the backward cycles through (the edge blocks have their own)
    grad_slot_bytes: int = 0
    # Blocks with the edge slot (an optimizer and a gradient slot of their own, shared in backward
    # order): () none, ("embed",) a tied embedding, (head, "embed") the untied head and embedding.
    edge_blocks: tuple = ()
    edge_opt_bytes: int = 0
    edge_grad_bytes: int = 0
    cache_blocks: tuple = ()  # blocks whose live states and weights stay in host RAM between steps
    cache_bytes: int = 0  # host RAM of that cache (its own pool, outside cpu_bytes())
    micro_batches: int = 1
    # Activation placement (recompute backward only): the inputs of layers 1..n_offloaded (every
    # micro-batch) go to host memory after their forward and come back just before their backward;
    # the other block inputs stay on the device.
    n_offloaded: int = 0
    n_on_ssd: int = 0  # of those, layers 1..n_on_ssd go to scratch files in the store instead of host memory
    # Layers whose inputs are freed after their forward and recomputed in their backward from the
    # previous layer's input, with that layer's weights (the next consumer's, already in its slot).
    recomputed_inputs: tuple = ()

    def offloaded_act_bytes(self) -> int:
        # Host-held inputs, plus a staging buffer each way for the ones on the SSD.
        host = (self.n_offloaded - self.n_on_ssd) * self.micro_batches + (2 if self.n_on_ssd else 0)
        return host * aligned_bytes(self.act_bytes)

    def slot_bytes(self) -> int:
        """Host bytes of the weight staging, optimizer, gradient and edge slots."""
        return (
            self.weight_slots * self.stage_slot_bytes
            + self.opt_slots * self.opt_slot_bytes
            + self.grad_slots * self.grad_slot_bytes
            + self.edge_opt_bytes
            + self.edge_grad_bytes
        )

    def cpu_bytes(self) -> int:
        return self.slot_bytes() + self.offloaded_act_bytes()

    def device_bytes(self) -> int:
        on_device = (
            self.n_acts
            - (self.n_offloaded + len(self.recomputed_inputs)) * self.micro_batches
            + min(self.n_offloaded, ACT_OFFLOAD_WINDOW) * self.micro_batches
            + (2 * self.micro_batches if self.recomputed_inputs else 0)  # a dropped input in its forward; a recomputed one
        )
        return self.device_slots * self.device_slot_bytes + on_device * aligned_bytes(self.act_bytes) + self.workspace_bytes + self.kept_bytes

    @property
    def recompute(self) -> bool:
        return self.kept_bytes == 0


def disk_peak_bytes(store: Store, plan: MemoryPlan, *, disk_mode: str = "safe", keeps_grads: bool = False, frozen: bool = False) -> int:
    """The store's peak footprint during a step: the state, plus (safe mode) a second copy of it until
    the commit, or (lean) one copy of the weights and one block's states; plus the gradients a
    clipping run keeps and the block inputs offloaded to scratch files. A frozen base: its weights."""
    state = store.state_bytes()
    if frozen:
        return state
    weights = sum(lay.kinds["weights"].file_bytes for lay in store.layouts.values())
    largest_block = max(kl.file_bytes for lay in store.layouts.values() for kl in lay.kinds.values())
    grads = 4 * store.numel() if keeps_grads else 0
    scratch = plan.n_on_ssd * plan.micro_batches * plan.act_bytes
    return state + (state if disk_mode == "safe" else weights + largest_block) + grads + scratch


CACHE_AUTO_RAM_FRACTION = 0.25  # default block cache: at most this share of the RAM


def cache_entry_bytes(store: Store, block: str) -> int:
    """Host bytes that cache one block: its master, moments and compute weights, as the store holds them."""
    return opt_region_offsets(store, block)["end"]


def plan_cache(store: Store, cache_budget: Optional[int]) -> tuple:
    """(blocks, bytes) of the block cache: whole blocks in forward order (their reads open each step)
    while they fit `cache_budget` (None: a quarter of this machine's RAM)."""
    if cache_budget is None:
        cache_budget = int(psutil.virtual_memory().total * CACHE_AUTO_RAM_FRACTION)
    blocks, used = [], 0
    for b in store.block_names:
        n = cache_entry_bytes(store, b)
        if store.layouts[b].numel == 0 or used + n > cache_budget:
            continue
        blocks.append(b)
        used += n
    return tuple(blocks), used


def plan_memory(
    store: Store,
    cons: List[Consumer],
    *,
    tied: bool,
    device: torch.device,
    compute_dtype: torch.dtype,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    micro_batch_size: int,
    micro_batches: int,
    seq_len: int,
    prefetch_depth: int,
    cpu_budget: Optional[int],
    device_budget: Optional[int],
    recompute: str = "always",
    frozen: bool = False,
) -> MemoryPlan:
    """recompute: "always" (the backward recomputes each block from its saved input), "never" (the
    forward keeps each layer's autograd activations; weights are not kept, see compute.py), or
    "auto" (keep them when they fit the device budget). `frozen`: the weights are not trained (LoRA
    adapters beside them are): no optimizer or gradient slots."""
    if recompute not in ("always", "never", "auto"):
        raise ValueError(f"recompute {recompute!r} unknown; choose always, never or auto")
    esize = torch.empty((), dtype=compute_dtype).element_size()
    stored_dtype = store.layouts[store.block_names[1 if len(store.block_names) > 2 else 0]].kinds["weights"].parts[0].dtype
    copy = device.type != "cpu" or stored_dtype != compute_dtype
    stage = max(sum(store.layouts[b].kinds["weights"].file_bytes for b in c.weight_blocks) for c in cons)
    dev_slot = max(sum(aligned_bytes(store.layouts[b].numel * esize) for b in c.weight_blocks) for c in cons) if copy else 0
    layouts = slot_layouts(store, tied, frozen)
    n_blocks = len(store.block_names)
    act = micro_batch_size * seq_len * hidden_size * esize
    n_acts = (n_blocks - 1) * micro_batches + micro_batches  # block inputs (layers + head) + output grads
    tokens = micro_batch_size * seq_len
    # Workspace of one block's recompute+backward for one micro-batch (measured shape of a decoder
    # layer: ~12 hidden-sized and ~4 intermediate-sized activations) or of the head (logits, their
    # fp32 copy and gradient), plus the block's gradients on the device when it is not the host.
    grad_dev = max(store.layouts[b].numel for b in store.block_names) * esize if device.type != "cpu" and not frozen else 0
    workspace = max(tokens * (12 * hidden_size + 4 * intermediate_size) * esize, tokens * vocab_size * (esize + 8)) + 2 * grad_dev
    # Autograd activations of every decoder layer and micro-batch, when the backward does not
    # recompute: measured 24 (Llama) and 17 (GPT-NeoX) hidden-sized fp32 values per token per layer
    # with sdpa attention; 10 hidden + 6 intermediate bounds both.
    kept = (n_blocks - 2) * micro_batches * tokens * (10 * hidden_size + 6 * intermediate_size) * esize
    ram = psutil.virtual_memory().total
    depth = prefetch_depth + 1
    auto_cpu = cpu_budget is None
    if cpu_budget is None:
        cpu_budget = min(depth * stage + layout_bytes(layouts[0], MAX_OPT_SLOTS, MAX_GRAD_SLOTS), ram // 2)
    if device_budget is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            device_budget = int(free * 0.9)
        else:
            want_kept = 0 if recompute == "always" else kept
            device_budget = min(depth * dev_slot + n_acts * aligned_bytes(act) + workspace + want_kept, ram // 2)
    plan = MemoryPlan(weight_slots=1, device_slots=1 if copy else 0, opt_slots=0 if frozen else 1, stage_slot_bytes=stage, device_slot_bytes=dev_slot,
                      act_bytes=act, n_acts=n_acts, workspace_bytes=workspace, cpu_budget_bytes=cpu_budget, device_budget_bytes=device_budget,
                      grad_slots=0 if frozen else 1, micro_batches=micro_batches, **layouts[0])
    if recompute != "always":
        plan.kept_bytes = kept
        if recompute == "auto" and plan.device_bytes() > device_budget:
            plan.kept_bytes = 0  # does not fit: recompute instead
    if plan.recompute and plan.device_bytes() > device_budget:  # block inputs do not fit the device
        plan = _place_block_inputs(plan, n_blocks - 2, device_budget, ram // 2 if auto_cpu else cpu_budget, copy)
        if auto_cpu:  # the host budget was not given: it includes the offloaded inputs
            cpu_budget = plan.cpu_budget_bytes = min(cpu_budget + plan.offloaded_act_bytes(), ram // 2)
    _check_minimum(plan)
    best = _grown(plan, depth, copy, frozen)
    for layout in layouts[1:]:  # the edge slot, when it fits and keeps the slots that matter as many
        alt = dataclasses.replace(plan, **layout)
        if alt.cpu_bytes() <= alt.cpu_budget_bytes:
            alt = _grown(alt, depth, copy, frozen)
            if _keeps_slots(alt, best):
                best = alt
    return best


def _keeps_slots(alt: MemoryPlan, plan: MemoryPlan) -> bool:
    """Whether `alt` has as many of the slots that matter as `plan`: gradient, optimizer and device
    slots, and a second weight slot (the read of the next block's weights during this block's
    compute). A third weight slot only reads further ahead; the edge slot takes the state read,
    update and write of the largest block out of the step's tail (docs/ARCHITECTURE.md)."""
    def counts(p: MemoryPlan) -> tuple:
        return p.grad_slots, p.opt_slots, min(p.weight_slots, 2), p.device_slots

    return all(a >= b for a, b in zip(counts(alt), counts(plan)))


def _grown(plan: MemoryPlan, depth: int, copy: bool, frozen: bool) -> MemoryPlan:
    """The plan grown from its minimum while the budgets allow: a second gradient slot first (the
    backward of the next block then runs while this block's optimizer does), a second weight slot
    (the next block's weights are read during this block's compute), then optimizer slots (they
    decouple state I/O from the optimizer), then prefetch depth."""
    plan = dataclasses.replace(plan)
    cpu_budget, device_budget = plan.cpu_budget_bytes, plan.device_budget_bytes
    if not frozen and plan.cpu_bytes() + plan.grad_slot_bytes <= cpu_budget:
        plan.grad_slots += 1
    if plan.weight_slots < min(depth, 2) and plan.cpu_bytes() + plan.stage_slot_bytes <= cpu_budget:
        plan.weight_slots += 1
    while not frozen and plan.opt_slots < MAX_OPT_SLOTS and plan.cpu_bytes() + plan.opt_slot_bytes <= cpu_budget:
        plan.opt_slots += 1
    while plan.weight_slots < depth and plan.cpu_bytes() + plan.stage_slot_bytes <= cpu_budget:
        plan.weight_slots += 1
    while copy and plan.device_slots < depth and plan.device_bytes() + plan.device_slot_bytes <= device_budget:
        plan.device_slots += 1
    return plan


def _place_block_inputs(plan: MemoryPlan, n_layers: int, device_budget: int, host_budget: int, copy: bool) -> MemoryPlan:
    """The plan with its block inputs fitted into the device budget: offload the earliest layers'
    (their backward comes last) to the host, layers 1..L-2, as few as fit the device; the earliest of those to the
    SSD when the host has no room for them; if that is not enough, also drop inputs of layers L-1,
    L-3, ... above the offloaded ones and recompute them in the backward from the input below (that
    input stays, so every other one goes). When nothing fits, returns the placement that needs the
    least device memory, so the budget error names the smallest device budget."""
    offloads = [0] + list(range(ACT_OFFLOAD_WINDOW, max(n_layers - 1, 0)))

    def droppable(k: int) -> list:
        return [i for i in range(n_layers - 1, 1, -2) if i - 1 > k]

    def placed(k: int, ssd: int, dropped=()) -> MemoryPlan:
        # Recomputing an input needs the next consumer's weights in their slot: two of each.
        slots = (max(plan.weight_slots, 2), max(plan.device_slots, 2) if copy else 0) if dropped else (plan.weight_slots, plan.device_slots)
        return dataclasses.replace(plan, n_offloaded=k, n_on_ssd=ssd, recomputed_inputs=tuple(sorted(dropped)), weight_slots=slots[0], device_slots=slots[1])

    tries = [placed(k, ssd) for k in offloads for ssd in range(k + 1)]  # host memory first, then the SSD
    tries += [placed(k, k, droppable(k)[:j]) for k in offloads for j in range(1, len(droppable(k)) + 1)]
    chosen = next((p for p in tries if p.device_bytes() <= device_budget and p.cpu_bytes() <= host_budget), None)
    if chosen is None:
        chosen = min((placed(k, k, d) for k in offloads for d in ((), droppable(k))), key=MemoryPlan.device_bytes)
    return chosen


def compute_dtype_for(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """On the CPU device compute in fp32 (on AVX2-only CPUs, such as the 2-vCPU EPYC dev box, bf16
    matmul is ~100x slower: ~1.3 GFLOP/s against 40-120 in fp32; fp32 also keeps the CPU device the
    exact reference); on a GPU in the stored compute-weight dtype, bf16 for fp8 codes."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return stored if stored.is_floating_point and stored.itemsize >= 2 else torch.bfloat16


def plan_for_model(store: Store, skeleton, *, device, batch: BatchConfig, memory: MemoryConfig, compute_dtype=None, frozen: bool = False) -> MemoryPlan:
    """The memory plan of a run: plan_memory for a Skeleton-like model (`.config`, `.tied`,
    `.blocks`) with the budgets, prefetch depth and recompute mode of `memory`, plus its block cache
    (see plan_cache). Raises BudgetError, naming the minimum, when the budgets cannot hold one block."""
    hf = skeleton.config
    device = torch.device(device)
    if compute_dtype is None:
        compute_dtype = compute_dtype_for(device, store.layouts[store.block_names[0]].kinds["weights"].parts[0].dtype)
    plan = plan_memory(
        store,
        model_consumers(store, skeleton, frozen=frozen),
        tied=skeleton.tied,
        device=device,
        compute_dtype=compute_dtype,
        hidden_size=getattr(skeleton, "hidden_width", hf.hidden_size),  # a block input's values per token
        intermediate_size=getattr(skeleton, "intermediate_width", None) or getattr(hf, "intermediate_size", 4 * hf.hidden_size),
        vocab_size=hf.vocab_size,
        micro_batch_size=batch.micro_batch_size,
        micro_batches=batch.micro_batches,
        seq_len=batch.seq_len,
        prefetch_depth=memory.prefetch_depth,
        cpu_budget=memory.cpu_mem_bytes,
        device_budget=memory.gpu_mem_bytes,
        recompute=memory.recompute,
        frozen=frozen,
    )
    plan.cache_blocks, plan.cache_bytes = plan_cache(store, memory.cache_mem_bytes)
    return plan


def _check_minimum(plan: MemoryPlan) -> None:
    need_cpu, need_dev = plan.cpu_bytes(), plan.device_bytes()
    if need_cpu > plan.cpu_budget_bytes:
        edge = (f", the {' and '.join(plan.edge_blocks)}'s own optimizer slot ({format_bytes(plan.edge_opt_bytes)}) and gradient slot "
                f"({format_bytes(plan.edge_grad_bytes)})" if plan.edge_blocks else "")
        raise BudgetError(
            f"--cpu-mem {format_bytes(plan.cpu_budget_bytes)} is too small: one weight slot ({format_bytes(plan.stage_slot_bytes)}), "
            f"an optimizer slot ({format_bytes(plan.opt_slot_bytes)}), a gradient slot ({format_bytes(plan.grad_slot_bytes)}){edge} "
            f"need {format_bytes(need_cpu)}; pass --cpu-mem {_round_up_mib(need_cpu)} or more"
        )
    if need_dev > plan.device_budget_bytes:
        raise BudgetError(
            f"--gpu-mem {format_bytes(plan.device_budget_bytes)} is too small: block inputs of every micro-batch "
            f"({plan.n_acts} x {format_bytes(plan.act_bytes)}, {plan.n_offloaded * plan.micro_batches} of them offloaded ({plan.n_on_ssd * plan.micro_batches} to the SSD), "
            f"{len(plan.recomputed_inputs) * plan.micro_batches} recomputed), the compute workspace ({format_bytes(plan.workspace_bytes)}), "
            f"kept activations ({format_bytes(plan.kept_bytes)}) and "
            f"{plan.device_slots} weight slot(s) need {format_bytes(need_dev)}; pass --gpu-mem {_round_up_mib(need_dev)} or more, "
            "or lower --batch-size / --seq-len / raise --micro-batches"
        )


def _round_up_mib(n: int) -> str:
    return f"{(n + (1 << 20) - 1) >> 20}MiB"
