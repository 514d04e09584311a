"""The runtime on a CUDA device: pinned host pools, side-stream H2D, device slots, D2H of gradients.

fp32 mode must match plain PyTorch trained on the same GPU; the compressed recipes must train.
These tests need a GPU (they skip without one: the CPU runtime is covered by test_exactness).
"""
import pytest
import torch

from fuyou.config import MemoryConfig, StateConfig
from tests.helpers import LR, WD, assert_trains_like_pytorch, random_batches, reference_train, run_fuyou, save_checkpoint, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 on both sides, TF32 off: what differs is kernel summation order and the optimizer running on
# the CPU (fuyou) instead of the GPU (reference).
RTOL, ATOL = 1e-5, 1e-6
STEPS, BATCH, SEQ, MICRO = 4, 4, 32, 2


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _assert_matches_reference(tmp_path, ckpt, batches, results):
    assert_trains_like_pytorch(str(tmp_path / "store"), ckpt, batches, MICRO, results, device="cuda", rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("recompute", ["never", "always"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cuda_fp32_matches_plain_pytorch(tmp_path, recompute, tied):
    cfg = tiny_config("llama", tie_word_embeddings=tied)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(STEPS, BATCH, SEQ, cfg.vocab_size, seed=11)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute=recompute), device="cuda")
    assert rt.device.type == "cuda" and rt.slots.device, "the run did not use device weight slots"
    assert rt.cpu_pool.pin, "host pools should be pinned on a CUDA device"
    assert rt.plan.recompute == (recompute == "always")
    _assert_matches_reference(tmp_path, ckpt, batches, results)


def test_cuda_out_of_core_matches_plain_pytorch(tmp_path):
    """Tight budgets: weight slots cycle on the device and on the host; still exact."""
    cfg = tiny_config("llama", num_hidden_layers=12, vocab_size=64)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(3, BATCH, SEQ, cfg.vocab_size, seed=12)
    cpu_mem, gpu_mem = 1_000_000, 2_000_000
    rt, results = run_fuyou(
        ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(cpu_mem_bytes=cpu_mem, gpu_mem_bytes=gpu_mem, prefetch_depth=1), device="cuda"
    )
    assert rt.store.state_bytes() >= 2 * (cpu_mem + gpu_mem)
    assert rt.cpu_pool.peak_bytes <= cpu_mem and rt.dev_pool.peak_bytes <= gpu_mem
    assert len(rt.slots.device) < len(rt.cons), "the device slots should be fewer than the blocks"
    _assert_matches_reference(tmp_path, ckpt, batches, results)


@pytest.mark.parametrize(
    "state,linear,tol",
    [
        (StateConfig(weights="bf16", master="bf16+rem", states="fp8"), None, 0.02),
        (StateConfig(weights="fp8", master="bf16+rem", states="fp8"), "fp8-blockwise", 0.05),
    ],
    ids=["bf16-weights-fp8-states", "fp8-weights-fp8-linear"],
)
def test_cuda_low_precision_recipes_track_fp32(tmp_path, state, linear, tol):
    """bf16/fp8 compute weights (Triton FP8 GEMMs for the second) stay within `tol` of the fp32
    reference's losses over a few steps on one repeated batch, and the loss falls."""
    cfg = tiny_config("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, vocab_size=256)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(1, BATCH, 64, cfg.vocab_size, seed=13) * 6
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, device="cuda", state=state, linear=linear)
    assert rt.compute_dtype == torch.bfloat16
    _m, ref_losses = reference_train(ckpt, batches, MICRO, lr=LR, weight_decay=WD, device="cuda")
    losses = torch.tensor([r.loss for r in results])
    torch.testing.assert_close(losses, torch.tensor(ref_losses), rtol=tol, atol=0.0)
    assert losses[-1] < losses[0] * 0.9, f"loss did not fall: {losses.tolist()}"


def test_cuda_offloaded_block_inputs_match_plain_pytorch(tmp_path):
    """A device budget too small for every block input: the earliest layers' go to pinned host
    memory on the d2h stream and come back on the h2d stream; still exact."""
    cfg = tiny_config("llama", num_hidden_layers=8)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(3, BATCH, SEQ, cfg.vocab_size, seed=14)
    full, _ = run_fuyou(ckpt, str(tmp_path / "full"), batches[:1], MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=1 << 30), device="cuda")
    # One device weight slot (the minimum) and room for two blocks' inputs fewer than all of them.
    p = full.plan
    budget = p.device_bytes() - (p.device_slots - 1) * p.device_slot_bytes - 2 * MICRO * p.act_bytes
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, MICRO, MemoryConfig(recompute="always", gpu_mem_bytes=budget), device="cuda")
    assert rt.plan.n_offloaded >= 3 and rt.dev_pool.peak_bytes <= budget
    assert any(e.name.startswith("act_in") for e in results[-1].events)
    _assert_matches_reference(tmp_path, ckpt, batches, results)
