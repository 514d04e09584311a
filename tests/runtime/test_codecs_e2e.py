"""Compressed state end to end: fuyou with bf16 or fp8 (128x128-tile E4M3) weights, bf16+rem master
and fp8/de8 moments equals a plain PyTorch loop that keeps the same encoded state per parameter,
computes on the same decoded weights, and calls the same update."""
import pytest
import torch

from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, StateConfig
from fuyou.model.importer import import_model
from fuyou.model.skeleton import Skeleton, causal_lm_loss_sum, count_targets
from fuyou.model.source import ModelSource
from fuyou.optim.state import KINDS, adamw_update_, decode_master, decode_weights, init_state_, state_layout
from fuyou.step.runtime import Runtime
from tests.helpers import random_batches, save_checkpoint, store_master_weights, tiny_config

LR = 1e-3


def reference(ckpt, cfg, batches, micro):
    """Plain PyTorch forward/backward on weights decoded from the codec state; the same update."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    state = {}
    for name, p in params.items():
        parts = {k: {s.name: torch.zeros(s.numel, dtype=s.dtype) for s in state_layout(cfg, k, p.numel(), tuple(p.shape))} for k in KINDS}
        init_state_(cfg, p.detach(), parts)
        state[name] = parts
    losses = []
    for batch in batches:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(decode_weights(cfg, state[name]["weights"], tuple(p.shape)).float().view(p.shape))
        model.zero_grad()
        total, loss = count_targets(batch.labels), 0.0
        for mb in batch.split(micro):
            ls = causal_lm_loss_sum(model(input_ids=mb.input_ids).logits, mb.labels)
            (ls / total).backward()
            loss += float(ls.detach())
        losses.append(loss / total)
        for name, p in params.items():
            adamw_update_(cfg, p.grad.reshape(-1), state[name], shape=tuple(p.shape), step=len(losses), lr=LR)
    return losses, {n: decode_master(cfg, s["master"], params[n].numel()) for n, s in state.items()}


@pytest.mark.parametrize("weights,states", [("bf16", "fp8"), ("bf16", "de8"), ("fp8", "fp8")])
def test_compressed_state_matches_reference_loop(tmp_path, weights, states):
    # 4096+ elements per matrix so the codecs really compress (smaller tensors stay fp32).
    mcfg = tiny_config("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), mcfg, tokenizer=False)
    cfg = StateConfig(weights=weights, master="bf16+rem", states=states)
    batches = random_batches(3, 4, 16, mcfg.vocab_size, seed=9)
    src = ModelSource(ckpt)
    store = import_model(src, str(tmp_path / "store"), cfg)
    rt = Runtime(store, Skeleton(src.config), device=torch.device("cpu"), memory=MemoryConfig(), batch=BatchConfig(batch_size=4, micro_batches=2, seq_len=16), optim=OptimConfig(lr=LR))
    try:
        results = [rt.step(b) for b in batches]
    finally:
        rt.close()
    ref_losses, ref_master = reference(ckpt, cfg, batches, 2)
    # Same bf16 weights, same fp32 compute: losses agree to fp32 summation order.
    torch.testing.assert_close(torch.tensor([r.loss for r in results]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    got = store_master_weights(str(tmp_path / "store"))
    for name, value in ref_master.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
    per_param = (results[0].bytes_read + results[0].bytes_written) / store.numel()
    assert per_param < (16.5 if weights == "fp8" else 21)  # vs 36 B/param in fp32 mode
