"""The host block cache: cached blocks' reads come from RAM (no store reads after the first step),
writes still go to the store, and training stays exact (fp32 mode vs plain PyTorch)."""
import pytest
import torch

from fuyou.config import MemoryConfig
from fuyou.optim.state import StateCodecs
from fuyou.step.memory_plan import cache_entry_bytes
from fuyou.store.store import open_store
from tests.helpers import LR, WD, assert_trains_like_pytorch, random_batches, run_fuyou, save_checkpoint, tiny_config

RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH, SEQ, MICRO = 4, 4, 16, 2


def _exact(tmp_path, ckpt, batches, results, max_grad_norm=None):
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results, max_grad_norm=max_grad_norm, rtol=RTOL, atol=ATOL)


def _setup(tmp_path, **overrides):
    cfg = tiny_config("llama", **overrides)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    return ckpt, random_batches(STEPS, BATCH, SEQ, cfg.vocab_size, seed=21)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_whole_model_cached_reads_nothing_after_the_first_step(tmp_path, tied):
    ckpt, batches = _setup(tmp_path, tie_word_embeddings=tied)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cache_mem_bytes=1 << 30))
    owners = [b for b in rt.store.block_names if rt.store.layouts[b].numel]
    assert list(rt.plan.cache_blocks) == owners
    assert results[0].bytes_read > 0  # the first step fills the cache from the store
    assert [r.bytes_read for r in results[1:]] == [0] * (STEPS - 1)
    assert len({r.bytes_written for r in results}) == 1 and results[0].bytes_written > 0  # write-through
    _exact(tmp_path, ckpt, batches, results)


def test_partial_cache_reads_only_the_other_blocks(tmp_path):
    ckpt, batches = _setup(tmp_path, num_hidden_layers=4)
    uncached, plain = run_fuyou(ckpt, str(tmp_path / "plain"), batches[:1], MICRO, MemoryConfig(cache_mem_bytes=0))
    full = plain[0].bytes_read
    budget = cache_entry_bytes(uncached.store, "embed") + cache_entry_bytes(uncached.store, "layer0000")
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cache_mem_bytes=budget))
    assert rt.plan.cache_blocks == ("embed", "layer0000")
    lay = [rt.store.layouts[b] for b in rt.plan.cache_blocks]
    weights = sum(x.kinds["weights"].nbytes for x in lay)
    states = sum(x.kinds[k].nbytes for x in lay for k in ("master", "exp_avg", "exp_avg_sq"))
    # First step: the forward's read fills the cache, so the backward's read of the same weights is a
    # copy. Later steps: a cached block's weights (forward and backward) and states all are.
    assert results[0].bytes_read == full - weights
    assert all(r.bytes_read == full - 2 * weights - states for r in results[1:])
    _exact(tmp_path, ckpt, batches, results)


def test_cache_off_reads_everything_every_step(tmp_path):
    ckpt, batches = _setup(tmp_path)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cache_mem_bytes=0))
    assert rt.plan.cache_blocks == () and rt.cache.entries == {}
    assert len({r.bytes_read for r in results}) == 1
    _exact(tmp_path, ckpt, batches, results)


def test_clipped_steps_with_the_cache_match_pytorch(tmp_path):
    """A clipped step redoes the optimizer from the old states: the cache, already holding the first
    pass's new version, must not serve them (the versions differ), and must end on the redone one."""
    from fuyou.config import BatchConfig, OptimConfig, StateConfig
    from fuyou.model.importer import import_model
    from fuyou.model.skeleton import Skeleton
    from fuyou.model.source import ModelSource
    from fuyou.step.runtime import Runtime

    ckpt, batches = _setup(tmp_path)
    src = ModelSource(ckpt)
    rt = Runtime(
        import_model(src, str(tmp_path / "store"), StateConfig()), Skeleton(src.config), device=torch.device("cpu"),
        memory=MemoryConfig(cache_mem_bytes=1 << 30), batch=BatchConfig(batch_size=BATCH, micro_batches=MICRO, seq_len=SEQ),
        optim=OptimConfig(lr=LR, weight_decay=WD), max_grad_norm=0.05,
    )
    try:
        results = [rt.step(b) for b in batches]
    finally:
        rt.close()
    assert [r.status for r in results].count("clipped") >= 2
    assert open_store(str(tmp_path / "store"), StateCodecs.from_json).step == STEPS
    _exact(tmp_path, ckpt, batches, results, max_grad_norm=0.05)


def test_fp32_weights_share_the_masters_bytes(tmp_path):
    """fp32 weights of an fp32 master are one region of the optimizer slot and of a cache entry
    (12 B/param, not 16); the store still holds both files, equal byte for byte after training;
    bf16 weights keep a region of their own."""
    from fuyou.config import StateConfig
    from fuyou.step.slot_sizes import opt_region_offsets, weights_are_master

    ckpt, batches = _setup(tmp_path)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cache_mem_bytes=1 << 30))
    store = rt.store
    for b in (b for b in store.block_names if store.layouts[b].numel):
        off, kinds = opt_region_offsets(store, b), store.layouts[b].kinds
        assert weights_are_master(store.layouts[b]) and off["weights"] == off["master"]
        assert off["end"] == sum(kinds[k].file_bytes for k in ("master", "exp_avg", "exp_avg_sq")) == cache_entry_bytes(store, b)
        v = store.version(b, "weights")
        with open(store.file_path(b, "weights", v), "rb") as w, open(store.file_path(b, "master", store.version(b, "master")), "rb") as m:
            assert w.read() == m.read()
    assert [r.bytes_read for r in results[1:]] == [0] * (STEPS - 1)  # every read a cache hit
    _exact(tmp_path, ckpt, batches, results)
    bf16 = run_fuyou(ckpt, str(tmp_path / "bf16"), batches[:1], MICRO, MemoryConfig(cache_mem_bytes=0), state=StateConfig(weights="bf16"))[0].store
    assert not any(weights_are_master(lay) for lay in bf16.layouts.values())
