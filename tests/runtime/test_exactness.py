"""fuyou in fp32 mode must train exactly like plain PyTorch (same data, same accumulation)."""
import pytest
import torch

from fuyou.config import MemoryConfig
from tests.helpers import LR, WD, assert_trains_like_pytorch, random_batches, reference_train, run_fuyou, save_checkpoint, store_master_weights, tiny_config

# fp32 everywhere: the only differences are summation order inside kernels.
RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH, SEQ, MICRO = 5, 4, 16, 2


@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {}), ("gpt_neox", {})],
    ids=["llama", "llama-tied", "qwen2", "mistral", "gpt_neox"],
)
@pytest.mark.parametrize("recompute", ["never", "always"])
def test_matches_plain_pytorch(tmp_path, arch, overrides, recompute):
    """Both backward modes: kept activations (weights re-resolved from the backward's slot) and
    recompute from the block input."""
    cfg = tiny_config(arch, **overrides)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(STEPS, BATCH, SEQ, cfg.vocab_size, seed=1)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute=recompute))
    assert rt.plan.recompute == (recompute == "always")
    ref_model, ref_losses = reference_train(ckpt, batches, MICRO, lr=LR, weight_decay=WD)
    torch.testing.assert_close(torch.tensor([r.loss for r in results]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    got = store_master_weights(str(tmp_path / "store"))
    ref = dict(ref_model.named_parameters())
    assert set(got) == {n for n in ref if n in got} and len(got) >= len(ref) - int(bool(overrides.get("tie_word_embeddings")))
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name].detach().reshape(-1), rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    # The weights really moved (a no-op runtime would fail here too).
    assert results[-1].loss != results[0].loss


def test_out_of_core_matches_reference(tmp_path):
    """State >= 4x (device + host budgets): still trains, still exact, pools stay within budget."""
    cfg = tiny_config("llama", num_hidden_layers=16, vocab_size=64)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(3, BATCH, SEQ, cfg.vocab_size, seed=2)
    cpu_mem, gpu_mem = 1_000_000, 450_000
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cpu_mem_bytes=cpu_mem, gpu_mem_bytes=gpu_mem, prefetch_depth=1))
    state = rt.store.state_bytes()
    assert state >= 4 * (cpu_mem + gpu_mem), f"test model too small: state {state} B"
    assert rt.cpu_pool.peak_bytes <= cpu_mem and rt.dev_pool.peak_bytes <= gpu_mem
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("micro", [1, 4])
def test_micro_batch_counts_match_reference(tmp_path, micro):
    """Layer-wise micro-batching with 1 or 4 micro-batches equals the reference's accumulation."""
    cfg = tiny_config("llama")
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(2, BATCH, SEQ, cfg.vocab_size, seed=3)
    _rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, micro)
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, micro, results, rtol=RTOL, atol=ATOL)
