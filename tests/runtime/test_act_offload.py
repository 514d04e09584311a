"""Activation placement: with a device budget too small for every block input, the earliest layers'
inputs go to host memory after their forward and come back before their backward; training is
unchanged (fp32 mode vs plain PyTorch) and the device pool stays within the smaller budget."""
import os

import pytest

from fuyou.config import MemoryConfig
from fuyou.step.memory_plan import BudgetError
from fuyou.step.slot_sizes import least_slot_bytes
from fuyou.planning.profile import graph_from_events
from tests.helpers import assert_trains_like_pytorch, random_batches, run_fuyou, save_checkpoint, tiny_config

RTOL, ATOL = 1e-5, 1e-6
MICRO = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    cfg = tiny_config("llama", num_hidden_layers=8)
    return save_checkpoint(str(tmp / "ckpt"), cfg, tokenizer=False), random_batches(3, 4, 16, cfg.vocab_size, seed=5)


def test_offloaded_inputs_train_exactly_within_the_smaller_budget(tmp_path, model):
    ckpt, batches = model
    full, full_res = run_fuyou(ckpt, str(tmp_path / "full"), batches, MICRO, MemoryConfig(recompute="always", cache_mem_bytes=0))
    assert full.plan.n_offloaded == 0
    act = full.plan.act_bytes  # one micro-batch's block input (4 KiB aligned here)
    budget = full.plan.device_bytes() - 2 * MICRO * act
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=budget, cache_mem_bytes=0))
    assert rt.plan.n_offloaded >= 3  # three stay on the device while they move: the first two save nothing
    assert rt.dev_pool.peak_bytes <= budget < full.dev_pool.peak_bytes
    names = {e.name.split(":")[0]: e.lane for e in results[-1].events if e.name.startswith("act_")}
    assert names == {**{f"act_out{i}": "d2h" for i in range(1, rt.plan.n_offloaded + 1)}, **{f"act_in{i}": "h2d" for i in range(1, rt.plan.n_offloaded + 1)}}
    assert [r.loss for r in results] == [r.loss for r in full_res]  # the same bytes come back
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results, rtol=RTOL, atol=ATOL)


def test_offload_takes_the_fewest_blocks_and_says_when_nothing_fits(tmp_path, model):
    ckpt, batches = model
    full, _ = run_fuyou(ckpt, str(tmp_path / "full"), batches[:1], MICRO, MemoryConfig(recompute="always", cache_mem_bytes=0))
    act = full.plan.act_bytes
    need = full.plan.device_bytes()
    rt, _ = run_fuyou(ckpt, str(tmp_path / "one"), batches[:1], MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=need - MICRO * act, cache_mem_bytes=0))
    assert rt.plan.n_offloaded == 4  # 3 blocks in flight + 1 saved = one block's worth
    # Layers 1..L-2 at most: 6 of 8, saving 3 blocks; one more than that cannot fit.
    with pytest.raises(BudgetError, match=r"12 of them offloaded \(12 to the SSD\)"):
        run_fuyou(ckpt, str(tmp_path / "none"), batches[:1], MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=need - 4 * MICRO * act, cache_mem_bytes=0))


def test_recomputed_inputs_train_exactly_when_the_host_has_no_room(tmp_path):
    """Large block inputs, a host budget with no room for them: the plan drops every other layer's
    input (3, 5, 7 of 8) and the backward recomputes it from the layer below, whose weights the next
    consumer's slot holds. Same losses and weights as plain PyTorch, smaller device peak."""
    cfg = tiny_config("llama", num_hidden_layers=8)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(2, 8, 256, cfg.vocab_size, seed=5)
    full, full_res = run_fuyou(ckpt, str(tmp_path / "full"), batches, MICRO, MemoryConfig(recompute="always", cache_mem_bytes=0))
    p = full.plan
    assert p.act_bytes > p.stage_slot_bytes  # inputs weigh more than a block's weights here
    host = 2 * p.stage_slot_bytes + least_slot_bytes(full.store, full.ctx.skeleton.tied) + 4096  # two weight slots, no inputs
    budget = p.device_bytes() - MICRO * p.act_bytes
    rt, results = run_fuyou(
        ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=budget, cpu_mem_bytes=host, cache_mem_bytes=0)
    )
    assert (rt.plan.n_offloaded, rt.plan.recomputed_inputs, rt.plan.weight_slots) == (0, (3, 5, 7), 2)
    assert graph_from_events(results[-1].events)[0] is not None  # the profiler rebuilds this step's graph
    assert rt.dev_pool.peak_bytes <= budget and rt.dev_pool.peak_bytes < full.dev_pool.peak_bytes
    assert [r.loss for r in results] == [r.loss for r in full_res]
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results, rtol=RTOL, atol=ATOL)


def test_inputs_offloaded_to_the_ssd_when_the_host_is_full(tmp_path, model):
    """A host budget with room for the slots and two staging buffers only: the offloaded inputs go
    to scratch files beside the store's blocks (write lane out, read lane back), removed once read."""
    ckpt, batches = model
    full, full_res = run_fuyou(ckpt, str(tmp_path / "full"), batches, MICRO, MemoryConfig(recompute="always", cache_mem_bytes=0))
    p = full.plan
    host = p.stage_slot_bytes + least_slot_bytes(full.store, full.ctx.skeleton.tied) + 2 * p.act_bytes
    budget = p.device_bytes() - 2 * MICRO * p.act_bytes
    rt, results = run_fuyou(
        ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=budget, cpu_mem_bytes=host, cache_mem_bytes=0)
    )
    assert rt.plan.n_offloaded == 5 and rt.plan.n_on_ssd == 5 and rt.plan.recomputed_inputs == ()
    assert graph_from_events(results[-1].events)[0] is not None  # the profiler rebuilds this step's graph
    assert rt.dev_pool.peak_bytes <= budget and rt.cpu_pool.peak_bytes <= host
    lanes = {e.name.split(":")[0]: e.lane for e in results[-1].events if e.name.startswith("act_")}
    assert lanes == {**{f"act_out{i}": "write" for i in range(1, 6)}, **{f"act_in{i}": "read" for i in range(1, 6)}}
    assert os.listdir(os.path.join(str(tmp_path / "store"), "scratch")) == []  # every scratch file read back and removed
    assert [r.loss for r in results] == [r.loss for r in full_res]
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results, rtol=RTOL, atol=ATOL)


def test_a_model_too_shallow_to_place_names_its_full_need(tmp_path):
    """Three layers: nothing can be offloaded or dropped with a gain, so a short budget is refused
    with the plain plan's need (not one made larger by a useless recompute)."""
    cfg = tiny_config("llama", num_hidden_layers=3)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(1, 4, 16, cfg.vocab_size, seed=5)
    full, _ = run_fuyou(ckpt, str(tmp_path / "full"), batches, MICRO, MemoryConfig(recompute="always", cache_mem_bytes=0))
    need = full.plan.device_bytes()
    with pytest.raises(BudgetError, match=rf"0 recomputed\).* need {need // 1024}\.00 KiB"):
        run_fuyou(ckpt, str(tmp_path / "s"), batches, MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=need - 4096, cache_mem_bytes=0))
