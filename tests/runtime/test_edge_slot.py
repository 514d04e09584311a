"""The edge slot: the untied head and embedding share an optimizer and a gradient slot of their own
(head first), so the cycled slots are sized for the largest layer and the embedding's state read
waits for the head's write instead of the last layer's. The plan takes it when it keeps every kind
of slot as many as the single-size layout; a run with it trains exactly like plain PyTorch."""
import pytest

from fuyou.config import BatchConfig, MemoryConfig, StateConfig
from fuyou.model.skeleton import EMBED, HEAD
from fuyou.planning.profile import graph_from_events
from fuyou.planning.search import model_shape, run_memory_plan
from fuyou.planning.settings import PlanConfig
from fuyou.step.slot_sizes import least_slot_bytes, opt_region_offsets
from fuyou.store.directio import aligned_bytes
from tests.helpers import assert_trains_like_pytorch, random_batches, run_fuyou, save_checkpoint, tiny_config

MICRO = 2
BATCH = BatchConfig(batch_size=4, micro_batches=MICRO, seq_len=16)
VOCAB = 1024  # the embedding and the head: 32 K parameters each, ~3x a layer


def _shape(tied: bool):
    return model_shape(tiny_config("llama", num_hidden_layers=4, vocab_size=VOCAB, tie_word_embeddings=tied), StateConfig())


def _plan(shape, cpu=None):
    memory = MemoryConfig(cpu_mem_bytes=cpu, cache_mem_bytes=0, prefetch_depth=1)
    return run_memory_plan(shape, PlanConfig(state=StateConfig(), batch=BATCH, device="cpu"), BATCH, memory)


def _opt(store, blocks) -> int:
    return max(opt_region_offsets(store, b)["end"] for b in blocks)


def test_the_cycled_slots_are_sized_for_the_layers():
    shape = _shape(tied=False)
    store = shape.store
    layers = [b for b in store.block_names if b not in (EMBED, HEAD)]
    plan = _plan(shape)  # no host budget: every slot the plan grows to, in either layout
    assert plan.edge_blocks == (HEAD, EMBED)
    assert plan.opt_slot_bytes == _opt(store, layers) < plan.edge_opt_bytes == _opt(store, [EMBED, HEAD])
    assert plan.grad_slot_bytes == max(aligned_bytes(4 * store.layouts[b].numel) for b in layers) < plan.edge_grad_bytes
    # Three layer-sized optimizer slots and the edge slot take less than three of the largest size.
    assert plan.opt_slots * plan.opt_slot_bytes + plan.edge_opt_bytes < plan.opt_slots * plan.edge_opt_bytes


def test_a_tied_embedding_keeps_the_edge_slot_and_the_head_cycles():
    shape = _shape(tied=True)
    plan = _plan(shape)
    assert plan.edge_blocks == (EMBED,)
    assert plan.opt_slot_bytes == _opt(shape.store, [b for b in shape.store.block_names if b != EMBED])
    assert plan.edge_opt_bytes == _opt(shape.store, [EMBED])


def test_the_edge_slot_only_when_it_keeps_every_kind_of_slot():
    shape = _shape(tied=False)
    full = _plan(shape)
    least = _plan(shape, full.stage_slot_bytes + least_slot_bytes(shape.store, False))
    assert (least.edge_blocks, least.opt_slots, least.grad_slots, least.weight_slots) == ((), 1, 1, 1)  # the edge slot does not fit
    # Room for two weight slots, one layer-sized optimizer slot, two layer-sized gradient slots and
    # the edge slot: the single-size layout would hold as many of each, no more.
    edge = 2 * full.stage_slot_bytes + full.opt_slot_bytes + 2 * full.grad_slot_bytes + full.edge_opt_bytes + full.edge_grad_bytes
    plan = _plan(shape, edge)
    assert (plan.edge_blocks, plan.opt_slots, plan.grad_slots, plan.weight_slots) == ((HEAD, EMBED), 1, 2, 2)
    assert plan.cpu_bytes() <= edge
    # One weight slot less: the single-size layout has room for the second one, the edge slot not.
    plan = _plan(shape, edge - full.stage_slot_bytes)
    assert (plan.edge_blocks, plan.opt_slots, plan.grad_slots, plan.weight_slots) == ((), 1, 2, 2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_config("llama", num_hidden_layers=4, vocab_size=VOCAB, tie_word_embeddings=False)
    return save_checkpoint(str(tmp_path_factory.mktemp("edge") / "ckpt"), cfg, tokenizer=False), random_batches(3, 4, 16, VOCAB, seed=3)


def test_the_edge_slot_trains_exactly(tmp_path, model):
    """One cycled optimizer slot beside the edge slot: same losses and weights as plain PyTorch, and
    the profiler rebuilds the step's graph with the edge slot from its trace."""
    ckpt, batches = model
    shape = _shape(tied=False)
    full = _plan(shape)
    budget = 2 * full.stage_slot_bytes + full.opt_slot_bytes + 2 * full.grad_slot_bytes + full.edge_opt_bytes + full.edge_grad_bytes
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cpu_mem_bytes=budget, cache_mem_bytes=0, prefetch_depth=1, recompute="always"))
    assert (rt.plan.edge_blocks, rt.plan.opt_slots) == ((HEAD, EMBED), 1)
    _graph, slots = graph_from_events(results[-1].events)
    assert slots["edge_slot"] == "head+embed" and slots["opt_slots"] == 1
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results)
