"""The planner's bytes are the runtime's: for every configuration of the prediction matrix (codecs,
fp8 weights, block cache, recompute, block inputs offloaded to the host and to the SSD,
micro-batches, lean disk mode, clipping), the step the planner builds from the model's config alone
is the step the runtime runs, and its bytes per link (store read and written, host <-> device,
block-cache reads) equal what the runtime counted where it moved them, exactly."""
import dataclasses

import pytest
import torch

from fuyou.config import BatchConfig, FinetuneConfig, MemoryConfig, OptimConfig, StateConfig
from fuyou.data.dataset import Batch
from fuyou.model.importer import import_model
from fuyou.model.skeleton import Skeleton
from fuyou.model.source import ModelSource
from fuyou.planning.search import model_shape, run_memory_plan, run_step_spec
from fuyou.planning.settings import PlanConfig
from fuyou.step.graph import build_redo_graph, build_step_graph, bytes_per_step
from fuyou.step.slot_sizes import least_slot_bytes
from fuyou.step.runtime import Runtime
from fuyou.store.directio import aligned_bytes
from tests.helpers import save_checkpoint, tiny_config

BATCH = BatchConfig(batch_size=4, micro_batches=2, seq_len=32)
FP8_STATES = StateConfig(master="bf16+rem", states="fp8")
MATRIX = {  # name: (state codecs, memory, batch, disk mode, clipping)
    "fp32, cache off": (StateConfig(), MemoryConfig(cache_mem_bytes=0), BATCH, "safe", None),
    "fp32, cache on": (StateConfig(), MemoryConfig(), BATCH, "safe", None),
    "fp8 states": (FP8_STATES, MemoryConfig(cache_mem_bytes=0), BATCH, "safe", None),
    "fp8 weights": (dataclasses.replace(FP8_STATES, weights="fp8"), MemoryConfig(cache_mem_bytes=0), BATCH, "safe", None),
    "bf16 weights, cache on": (StateConfig(weights="bf16"), MemoryConfig(), BATCH, "safe", None),
    "recompute always": (StateConfig(), MemoryConfig(cache_mem_bytes=0, recompute="always"), BATCH, "safe", None),
    "inputs offloaded to the host": (StateConfig(), "host", BATCH, "safe", None),
    "inputs offloaded to the SSD": (StateConfig(), "ssd", BATCH, "safe", None),
    "4 micro-batches, prefetch 0": (StateConfig(), MemoryConfig(cache_mem_bytes=0, prefetch_depth=0), dataclasses.replace(BATCH, micro_batches=4),
                                    "safe", None),
    "lean disk mode": (StateConfig(), MemoryConfig(cache_mem_bytes=0), BATCH, "lean", None),
    "clipped every step": (StateConfig(), MemoryConfig(cache_mem_bytes=0), BATCH, "safe", 1e-3),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "m"), tiny_config("llama", num_hidden_layers=8), tokenizer=False)


def offloading_memory(shape, cfg, batch, to_ssd: bool) -> MemoryConfig:
    """Budgets under which the recompute backward's block inputs do not all fit the device: some go
    to host memory, or (the host kept to its slots) to scratch files."""
    full = run_memory_plan(shape, cfg, batch, MemoryConfig(cache_mem_bytes=0, recompute="always"))
    device = full.device_bytes() - full.micro_batches * aligned_bytes(full.act_bytes)  # one layer's inputs too many
    # The SSD: the host holds one slot of each kind and the scratch files' two staging buffers, no more.
    host = full.stage_slot_bytes + least_slot_bytes(shape.store, shape.tied) + 2 * aligned_bytes(full.act_bytes) if to_ssd else None
    return MemoryConfig(cache_mem_bytes=0, recompute="always", gpu_mem_bytes=device, cpu_mem_bytes=host)


@pytest.mark.parametrize("name", list(MATRIX))
def test_predicted_bytes_are_the_runtimes(ckpt, tmp_path, name):
    state, memory, batch, disk_mode, clip = MATRIX[name]
    cfg = PlanConfig(state=state, batch=batch, job=FinetuneConfig(disk_mode=disk_mode, max_grad_norm=clip), device="cpu")
    source = ModelSource(ckpt)
    shape = model_shape(source.config, state)
    if isinstance(memory, str):
        memory = offloading_memory(shape, cfg, batch, to_ssd=memory == "ssd")
    plan = run_memory_plan(shape, cfg, batch, memory)
    spec = run_step_spec(shape, cfg, batch, plan)
    store = import_model(source, str(tmp_path / "store"), state)
    rt = Runtime(store, Skeleton(source.config), device=torch.device("cpu"), memory=memory, batch=batch, optim=OptimConfig(lr=1e-3),
                 max_grad_norm=clip, disk_mode=disk_mode)
    try:
        assert rt.spec == spec  # the planner builds, from the config alone, the step the runtime runs
        g = torch.Generator().manual_seed(0)
        results, hits = [], []
        for _ in range(2):  # the second step: the block cache holds what the first one wrote
            ids = torch.randint(0, source.config.vocab_size, (batch.batch_size, batch.seq_len), generator=g)
            before = rt.cache.hit_bytes
            results.append(rt.step(Batch(ids, ids.clone(), None)))
            hits.append(rt.cache.hit_bytes - before)
    finally:
        rt.close()
    got = results[-1]
    assert got.status == ("clipped" if clip else "ok")
    tasks = build_step_graph(spec).tasks + (build_redo_graph(spec).tasks if clip else [])
    want = bytes_per_step(tasks)
    counted = {"ssd read": got.bytes_read, "ssd written": got.bytes_written, "cpu->gpu": got.bytes_h2d, "gpu->cpu": got.bytes_d2h,
               "between ranks": got.bytes_between_ranks, "block cache read": hits[-1]}
    assert counted == want
    # The configuration exercises what its name says.
    if name.startswith("inputs offloaded"):
        assert plan.n_offloaded and bool(plan.n_on_ssd) == name.endswith("SSD")
    assert bool(want["block cache read"]) == (memory.cache_mem_bytes != 0)
    assert bool(want["cpu->gpu"]) == (state.weights != "fp32" or name == "inputs offloaded to the host")
