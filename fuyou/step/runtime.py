"""One training step over a model whose state lives in the store (DESIGN §2), as a task graph.

Compute order (the "consumers" of weights, one compute task each):
    fwd embed, fwd layer 0..L-1, head (forward + loss + backward, fused), bwd layer L-1..0, bwd embed
Every micro-batch passes a block before the next block (layer-wise micro-batching), so weights are
read once per phase per step whatever the batch. Around the compute lane:
    read    weights of consumer u into host staging slot u % W      (ahead by the prefetch depth)
    h2d     staging -> device slot (only when the device is not the host or dtypes differ)
    read    master/moments of block b into optimizer slot            (as soon as the slot is free)
    optim   AdamW on block b right after its backward                (overlaps the next backward)
    write   new master/moments/weights of b as new version files
    commit  (after the graph) atomically switch the manifest to the new step
Slot reuse is expressed as dependencies, so no task ever waits for memory: it only starts when the
task that last used its slot has finished.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from scheduler import Executor, Trace

from ..config import BatchConfig, MemoryConfig, OptimConfig
from ..data.dataset import Batch
from ..faults import crash_point
from ..memory import Pool
from ..model.skeleton import EMBED, Skeleton, count_targets
from ..optim.state import OPTIM_KINDS, adamw_update_, decode_weights
from ..store.directio import DirectFile, aligned_bytes
from ..store.store import Store
from .graph import LANES, Consumer, assign_opt_slots, build_redo_graph, build_step_graph, model_consumers, step_spec
from .memory_plan import cache_entry_bytes, compute_dtype_for, opt_region_offsets, plan_for_model



@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    grad_norm: float
    lr: float
    bytes_read: int
    bytes_written: int
    seconds: float
    events: list = field(default_factory=list)
    status: str = "ok"  # "ok", "clipped" (optimizer redone with the clip factor) or "skipped" (non-finite)


class Runtime:
    """Owns the pools, slots and executor of a run; `step(batch)` trains one optimizer step."""

    def __init__(
        self,
        store: Store,
        skeleton: Skeleton,
        *,
        device: torch.device,
        memory: MemoryConfig,
        batch: BatchConfig,
        optim: OptimConfig,
        trace: Optional[Trace] = None,
        max_grad_norm: Optional[float] = None,
        disk_mode: str = "safe",
    ):
        self.store, self.sk, self.device = store, skeleton, torch.device(device)
        self.batch_cfg, self.optim_cfg = batch, optim
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        if disk_mode not in ("safe", "lean"):
            raise ValueError(f"disk mode {disk_mode!r} unknown; choose safe or lean")
        if disk_mode == "lean" and max_grad_norm is not None:
            raise ValueError(
                "--max-grad-norm needs --disk-mode safe: lean mode replaces each block's states before the global norm is known"
            )
        self.disk_mode = disk_mode
        self.compute_dtype = compute_dtype_for(self.device, store.layouts[store.block_names[0]].kinds["weights"].parts[0].dtype)
        self.cons: List[Consumer] = model_consumers(store, skeleton)
        self.plan = plan_for_model(
            store,
            skeleton,
            device=self.device,
            batch=batch,
            prefetch_depth=memory.prefetch_depth,
            cpu_budget=memory.cpu_mem_bytes,
            device_budget=memory.gpu_mem_bytes,
            compute_dtype=self.compute_dtype,
            recompute=memory.recompute,
            cache_budget=memory.cache_mem_bytes,
        )
        p = self.plan
        self.cpu_pool = Pool("cpu", p.cpu_budget_bytes, torch.device("cpu"), pin=self.device.type == "cuda")
        self.dev_pool = Pool("gpu" if self.device.type == "cuda" else "device", p.device_budget_bytes, self.device)
        self.dev_pool.reserve(p.workspace_bytes + p.kept_bytes, "compute workspace and kept activations")
        self.stage = [self.cpu_pool.alloc(p.stage_slot_bytes) for _ in range(p.weight_slots)]
        self.dslots = [self.dev_pool.alloc(p.device_slot_bytes) for _ in range(p.device_slots)]
        self.oslots = [self.cpu_pool.alloc(p.opt_slot_bytes) for _ in range(p.opt_slots)]
        self.tied_slot = self.cpu_pool.alloc(p.opt_slot_bytes) if p.tied_slot else None
        self.gslots = [self.cpu_pool.alloc(p.grad_slot_bytes) for _ in range(p.grad_slots)]
        self.tied_gslot = self.cpu_pool.alloc(p.grad_slot_bytes) if p.tied_slot else None
        # The block cache: each cached block's live master, moments and weights, laid out as in an
        # optimizer slot, with the version of each kind it holds (a kind is used only while that
        # version is the store's live one, so a skipped or redone step can never read stale bytes).
        self.cache_pool = Pool("cache", p.cache_bytes, torch.device("cpu"))
        self.cache = {b: self.cache_pool.alloc(cache_entry_bytes(store, b)) for b in p.cache_blocks}
        self._cache_ver: Dict[str, Dict[str, int]] = {b: {} for b in p.cache_blocks}
        # Block inputs offloaded to the SSD: scratch files beside the blocks (leftovers of a killed
        # run removed), staged through pinned host buffers on a GPU.
        self._scratch = os.path.join(store.root, "scratch")
        shutil.rmtree(self._scratch, ignore_errors=True)
        if p.act_ssd:
            os.makedirs(self._scratch)
        stage_acts = p.act_ssd and self.device.type != "cpu"
        self._act_staging = [self.cpu_pool.alloc(aligned_bytes(p.act_bytes)) for _ in range(2)] if stage_acts else []
        skeleton.move_buffers(self.device)
        self.trace = trace if trace is not None else Trace()
        self.executor = Executor(LANES, self.trace)
        self._streams = {}
        if self.device.type == "cuda":
            self._streams = {"h2d": torch.cuda.Stream(self.device), "d2h": torch.cuda.Stream(self.device)}
        self._opt_owner = assign_opt_slots(self.cons, skeleton.tied, len(self.oslots), EMBED)
        # Gradient slots cycle in the same backward order (a tied embedding keeps its own).
        self._grad_owner = assign_opt_slots(self.cons, skeleton.tied, len(self.gslots), EMBED)
        self.spec = step_spec(store, self.cons, self.plan, self._opt_owner, skeleton, batch)

    def close(self) -> None:
        self.executor.shutdown()

    # -- slot bookkeeping --------------------------------------------------------------------
    def _opt_slot(self, block: str) -> torch.Tensor:
        idx = self._opt_owner[block]
        return self.tied_slot if idx < 0 else self.oslots[idx]

    def _grad_slot(self, block: str) -> torch.Tensor:
        idx = self._grad_owner[block]
        return self.tied_gslot if idx < 0 else self.gslots[idx]

    def _opt_views(self, block: str) -> dict:
        slot, offs, lay = self._opt_slot(block), opt_region_offsets(self.store, block), self.store.layouts[block]
        views = {k: lay.kinds[k].views(slot[offs[k] : offs[k] + lay.kinds[k].file_bytes]) for k in OPTIM_KINDS + ("weights",)}
        grad = self._grad_slot(block)[: lay.numel * 4].view(torch.float32)
        grads, off = {}, 0
        for name, numel in lay.params:
            grads[name] = grad[off : off + numel]
            off += numel
        return {"kinds": views, "grad": grad, "grads": grads}

    def _staged_weights(self, u: int) -> Dict[str, torch.Tensor]:
        """Consumer u's parameters decoded from its staging slot (views, or dequantized fp8)."""
        stage, off, out = self.stage[u % len(self.stage)], 0, {}
        for b in self.cons[u].weight_blocks:
            kl = self.store.layouts[b].kinds["weights"]
            for name, parts in kl.views(stage[off : off + kl.file_bytes]).items():
                out[name] = decode_weights(self.store.state.cfg, parts, self.store.layouts[b].shapes[name])
            off += kl.file_bytes
        return out

    def _device_weights(self, u: int) -> Dict[str, torch.Tensor]:
        """Consumer u's parameters in its device slot (compute dtype), flat."""
        dslot, off, out = self.dslots[u % len(self.dslots)], 0, {}
        esize = torch.empty((), dtype=self.compute_dtype).element_size()
        for b in self.cons[u].weight_blocks:
            for name, numel in self.store.layouts[b].params:
                out[name] = dslot[off : off + numel * esize].view(self.compute_dtype)
                off += aligned_bytes(numel * esize, 256)
        return out

    def _weights(self, u: int) -> Dict[str, torch.Tensor]:
        """What the compute of consumer u runs on: device slot views, or the staging views."""
        return self._device_weights(u) if self.dslots else self._staged_weights(u)

    # -- the step ------------------------------------------------------------------------------
    def step(self, batch: Batch, train_meta: Optional[dict] = None) -> StepResult:
        import time

        t0 = time.perf_counter()
        step = self.store.step + 1
        lr = self.optim_cfg.lr_at(step)
        mbs = batch.split(self.batch_cfg.micro_batches)
        if self.device.type != "cpu":
            mbs = [m.to(self.device) for m in mbs]
        st = _StepState(step, lr, mbs, count_targets(batch.labels))
        st.done_blocks = frozenset(b for b, j in self.store.journal.items() if j["step"] == step)
        r0, w0 = self.store.bytes_read, self.store.bytes_written
        n0 = len(self.trace.events)
        try:
            try:
                self.executor.run(build_step_graph(self.spec, _Bodies(self, st)), step=step)
            finally:
                st.free_activations(self.dev_pool, self.cpu_pool)
            norm = st.total_norm(list(self.sk.params))
            status = self._finish(st, norm)
        except BaseException:
            self.store.discard(step)  # nothing of this step is live; its files are garbage now
            raise
        meta = train_meta if train_meta is not None else self.store.manifest.get("train")
        if status == "skipped":
            self.store.discard(step)
            self.store.commit(step - 1, {}, meta)  # advance past the batch, no state change
        else:
            versions = {b: {k: step for k in OPTIM_KINDS + ("weights",)} for b in self.store.block_names if self._owns_params(b)}
            self.store.commit(step, versions, meta)
            self.store.discard(step, kinds=("grad",))
        return StepResult(
            step=step if status != "skipped" else step - 1,
            loss=sum(st.loss_sums) / max(st.targets, 1),
            tokens=int(batch.input_ids.numel()),
            grad_norm=norm,
            lr=lr,
            bytes_read=self.store.bytes_read - r0,
            bytes_written=self.store.bytes_written - w0,
            seconds=time.perf_counter() - t0,
            events=self.trace.events[n0:],
            status=status,
        )

    def _finish(self, st: "_StepState", norm: float) -> str:
        """Decide the step once the global gradient norm is known: commit, clip (redo), or skip.

        The optimizer already ran on every block with the unclipped gradient, writing new versions;
        the live (old) versions are untouched until the commit. A non-finite gradient skips the
        step. Clipping redoes the optimizer from the old states and the kept gradients with
        torch.nn.utils.clip_grad_norm_'s factor max_norm / (norm + 1e-6).
        """
        if not math.isfinite(norm):
            return "skipped"
        if self.max_grad_norm is None:
            return "ok"
        # In fp32, as clip_grad_norm_ computes it, so the clipped step matches PyTorch's.
        coef = float(torch.clamp(self.max_grad_norm / (torch.tensor(norm, dtype=torch.float32) + 1e-6), max=1.0))
        if coef >= 1.0:
            return "ok"
        st.grad_scale = coef
        self.executor.run(build_redo_graph(self.spec, _Bodies(self, st)), step=st.step)
        return "clipped"

    def _owns_params(self, block: str) -> bool:
        return self.store.layouts[block].numel > 0

    def _grad_blocks(self, c: Consumer) -> List[str]:
        """Blocks whose gradient slot consumer c writes into."""
        if c.phase == "fwd":
            return []
        return [b for b in c.weight_blocks if self._owns_params(b)]

    # -- task bodies -----------------------------------------------------------------------------
    # -- block cache -----------------------------------------------------------------------------
    def _cache_region(self, block: str, kind: str) -> torch.Tensor:
        offs = opt_region_offsets(self.store, block)
        return self.cache[block][offs[kind] : offs[kind] + self.store.layouts[block].kinds[kind].file_bytes]

    def _read_kind(self, block: str, kind: str, into: torch.Tensor) -> None:
        """The live version of (block, kind) into `into`: from the block cache when it holds that
        version, else from the store (and then into the cache, for the next step)."""
        cached, live = block in self.cache, self.store.version(block, kind)
        if cached and self._cache_ver[block].get(kind) == live:
            into.copy_(self._cache_region(block, kind))
            return
        self.store.read(block, kind, into)
        if cached:
            self._cache_region(block, kind).copy_(into)
            self._cache_ver[block][kind] = live

    def _cache_new_version(self, block: str, step: int) -> None:
        """After a block's new files are written: its optimizer slot becomes the cached copy of
        version `step` (used once the step commits, or the journal makes it live)."""
        if block not in self.cache:
            return
        self._cache_ver[block] = {}  # invalid while the copy is under way
        slot, end = self._opt_slot(block), opt_region_offsets(self.store, block)["end"]
        self.cache[block].copy_(slot[:end])
        self._cache_ver[block] = {k: step for k in OPTIM_KINDS + ("weights",)}

    def _read_weights_fn(self, u: int):
        def run():
            stage, off = self.stage[u % len(self.stage)], 0
            for b in self.cons[u].weight_blocks:
                kl = self.store.layouts[b].kinds["weights"]
                self._read_kind(b, "weights", stage[off : off + kl.file_bytes])
                off += kl.file_bytes

        return run

    def _h2d_fn(self, u: int, st: "_StepState"):
        def run():
            # Decode (fp8 dequantization, upcast) here, on the h2d lane, not on the compute lane.
            src, dst = self._staged_weights(u), self._device_weights(u)
            stream = self._streams.get("h2d")
            ctx = torch.cuda.stream(stream) if stream is not None else _null()
            with ctx:
                for name, t in src.items():
                    dst[name].copy_(t, non_blocking=stream is not None)
            if stream is not None:
                stream.synchronize()  # the staging slot is reused as soon as this task ends

        return run

    def _read_states_fn(self, b: str):
        def run():
            slot, offs, lay = self._opt_slot(b), opt_region_offsets(self.store, b), self.store.layouts[b]
            for k in OPTIM_KINDS:
                self._read_kind(b, k, slot[offs[k] : offs[k] + lay.kinds[k].file_bytes])

        return run

    def _optim_fn(self, b: str, st: "_StepState"):
        def run():
            crash_point("optim")
            v = self._opt_views(b)
            cfg, o = self.store.state.cfg, self.optim_cfg
            if st.grad_scale == 1.0:  # the first pass measures the norm; a redo reuses it
                norms = {name: torch.linalg.vector_norm(g) for name, g in v["grads"].items()}
                st.add_norms(norms)
                if self.max_grad_norm is not None:
                    # Kept until the commit: a clipped step is redone from these and the old states.
                    # Written here, before the gradient slot is handed to the next block.
                    self.store.write(b, "grad", v["grad"], version=st.step)
                if b in st.done_blocks:
                    return  # lean mode, resumed step: this block's update is already live
                if self.disk_mode == "lean" and not all(bool(torch.isfinite(n)) for n in norms.values()):
                    raise FloatingPointError(
                        f"non-finite gradient in {b} at step {st.step}; lean disk mode cannot skip a step whose other blocks may be "
                        "updated already: lower --lr or fix the data, or train with --disk-mode safe"
                    )
            for name, _numel in self.store.layouts[b].params:
                parts = {k: v["kinds"][k][name] for k in v["kinds"]}
                adamw_update_(
                    cfg,
                    v["grads"][name],
                    parts,
                    shape=self.store.layouts[b].shapes[name],
                    step=st.step,
                    lr=st.lr,
                    beta1=o.beta1,
                    beta2=o.beta2,
                    eps=o.eps,
                    weight_decay=o.weight_decay,
                    grad_scale=st.grad_scale,
                )

        return run

    def _write_fn(self, b: str, step: int, redo: bool = False, done: frozenset = frozenset()):
        def run():
            if b in done:
                return
            slot, offs, lay = self._opt_slot(b), opt_region_offsets(self.store, b), self.store.layouts[b]
            for k in OPTIM_KINDS + ("weights",):
                self.store.write(b, k, slot[offs[k] : offs[k] + lay.kinds[k].file_bytes], version=step)
            self._cache_new_version(b, step)
            if self.disk_mode == "lean":
                self.store.commit_block(b, step, OPTIM_KINDS + ("weights",))

        return run

    def _read_grad_fn(self, b: str, step: int):
        def run():
            self.store.read(b, "grad", self._grad_slot(b)[: self.store.layouts[b].numel * 4], version=step)

        return run

    def _act_out_fn(self, i: int, st: "_StepState"):
        """Layer i's saved inputs (every micro-batch) to host buffers or scratch files; their device buffers freed."""
        if i <= self.plan.act_ssd:
            return self._act_write_fn(i, st)
        return self._act_move_fn(i, st.acts, st.host_acts, self.dev_pool, self.cpu_pool, "d2h", len(st.mbs))

    def _act_in_fn(self, i: int, st: "_StepState"):
        """Layer i's inputs back into device buffers, for its backward."""
        if i <= self.plan.act_ssd:
            return self._act_read_fn(i, st)
        return self._act_move_fn(i, st.host_acts, st.acts, self.cpu_pool, self.dev_pool, "h2d", len(st.mbs))

    def _act_write_fn(self, i: int, st: "_StepState"):
        """Layer i's inputs to scratch files beside the store's blocks (O_DIRECT, no fsync: they live
        for one step); on a GPU through a pinned staging buffer."""

        def run():
            staging = self._act_staging[0] if self._act_staging else None
            for m in range(len(st.mbs)):
                buf, t = st.acts.pop((i, m))
                nbytes = t.numel() * t.element_size()
                src = buf
                if staging is not None:
                    staging[:nbytes].view(t.dtype).view(t.shape).copy_(t)
                    src = staging
                path = os.path.join(self._scratch, f"act.{i}.{m}.bin")
                with DirectFile(path, "w", self.store.backend) as f:
                    f.pwrite(src, size=nbytes).get()
                st.ssd_acts[(i, m)] = (path, t.dtype, t.shape, nbytes)
                self.dev_pool.free(buf)

        return run

    def _act_read_fn(self, i: int, st: "_StepState"):
        """Layer i's inputs back from their scratch files into device buffers; the files removed."""

        def run():
            staging = self._act_staging[1] if self._act_staging else None
            for m in range(len(st.mbs)):
                path, dtype, shape, nbytes = st.ssd_acts.pop((i, m))
                buf = self.dev_pool.alloc(nbytes)
                with DirectFile(path, "r", self.store.backend) as f:
                    f.pread(staging if staging is not None else buf, size=nbytes).get()
                t = buf.view(dtype).view(shape)
                if staging is not None:
                    t.copy_(staging[:nbytes].view(dtype).view(shape))
                os.unlink(path)
                st.acts[(i, m)] = (buf, t)

        return run

    def _act_move_fn(self, i: int, src: dict, dst: dict, src_pool: Pool, dst_pool: Pool, lane: str, n_micro: int):
        def run():
            stream = self._streams.get(lane)
            for m in range(n_micro):
                buf, t = src.pop((i, m))
                out = dst_pool.alloc(t.numel() * t.element_size())
                moved = out.view(t.dtype).view(t.shape)
                with torch.cuda.stream(stream) if stream is not None else _null():
                    moved.copy_(t, non_blocking=stream is not None)
                if stream is not None:
                    stream.synchronize()
                dst[(i, m)] = (out, moved)
                src_pool.free(buf)

        return run

    def _compute_fn(self, u: int, st: "_StepState"):
        def run():
            from .compute import run_consumer

            run_consumer(self, u, st)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # slots reused once this task ends

        return run


class _Bodies:
    """The runtime's task bodies for one step, in the shape build_step_graph asks for."""

    def __init__(self, rt: Runtime, st: "_StepState"):
        self.rt, self.st = rt, st

    def read_weights(self, u):
        return self.rt._read_weights_fn(u)

    def h2d(self, u):
        return self.rt._h2d_fn(u, self.st)

    def compute(self, u):
        return self.rt._compute_fn(u, self.st)

    def read_states(self, b):
        return _noop if b in self.st.done_blocks else self.rt._read_states_fn(b)

    def optim(self, b):
        return self.rt._optim_fn(b, self.st)

    def write(self, b):
        return self.rt._write_fn(b, self.st.step, redo=self.st.grad_scale != 1.0, done=self.st.done_blocks)

    def read_grad(self, b):
        return self.rt._read_grad_fn(b, self.st.step)

    def act_out(self, i):
        return self.rt._act_out_fn(i, self.st)

    def act_in(self, i):
        return self.rt._act_in_fn(i, self.st)


def _noop() -> None:
    return None


class _StepState:
    """What one step's tasks share: micro-batches, saved block inputs, output grads, the loss."""

    def __init__(self, step: int, lr: float, mbs: List[Batch], targets: int):
        self.step, self.lr, self.mbs, self.targets = step, lr, mbs, targets
        self.kwargs: Dict[int, dict] = {}
        self.acts: Dict[tuple, tuple] = {}  # (block index, micro-batch) -> (pool buffer, tensor)
        self.host_acts: Dict[tuple, tuple] = {}  # the offloaded ones: (host pool buffer, tensor)
        self.ssd_acts: Dict[tuple, tuple] = {}  # those in scratch files: (path, dtype, shape, bytes)
        self.dh: Dict[int, torch.Tensor] = {}
        self.graphs: Dict[tuple, tuple] = {}  # kept forward: (block, micro-batch) -> (input, output)
        self.refs: Dict[int, object] = {}  # kept forward: block -> its saved-weight hooks
        self.fwd_params: Dict[int, dict] = {}  # kept forward: block -> the Parameters its graph uses
        self.loss_sums: List[float] = []
        self.grad_started: set = set()  # blocks whose gradient region this step has zeroed
        self.grad_scale = 1.0  # clip factor of a redone optimizer pass
        self.done_blocks: frozenset = frozenset()  # lean mode: blocks already updated by a crashed run
        self.norms: Dict[str, torch.Tensor] = {}  # per-parameter fp32 gradient norms
        self._lock = threading.Lock()

    def add_norms(self, norms: Dict[str, torch.Tensor]) -> None:
        with self._lock:
            self.norms.update(norms)

    def total_norm(self, order: List[str]) -> float:
        """Global L2 norm, reduced like torch.nn.utils.clip_grad_norm_ (fp32, parameter order)."""
        norms = [self.norms[n] for n in order if n in self.norms]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def save(self, pool: Pool, key: tuple, t: torch.Tensor) -> None:
        buf = pool.alloc(t.numel() * t.element_size())
        saved = buf.view(t.dtype).view(t.shape)
        saved.copy_(t)
        self.acts[key] = (buf, saved)

    def take(self, key: tuple) -> tuple:
        """Remove a saved block input: (pool buffer, tensor); free the buffer once done with it."""
        return self.acts.pop(key)

    def free_activations(self, pool: Pool, host_pool: Pool) -> None:
        for buf, _t in self.acts.values():
            pool.free(buf)
        self.acts.clear()
        for buf, _t in self.host_acts.values():
            host_pool.free(buf)
        self.host_acts.clear()
        for path, *_rest in self.ssd_acts.values():
            if os.path.exists(path):
                os.unlink(path)
        self.ssd_acts.clear()
        self.graphs.clear()
        self.refs.clear()
        self.fwd_params.clear()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
