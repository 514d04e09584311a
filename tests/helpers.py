"""Shared test helpers: tiny random checkpoints and the plain-PyTorch reference training."""
from __future__ import annotations

import os
from typing import List

import torch

from fuyou.data.dataset import Batch
from fuyou.model.skeleton import causal_lm_loss_sum, count_targets

LR, WD = 1e-3, 0.1  # the runtime tests' AdamW settings


def tiny_config(arch: str = "llama", **overrides):
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=128, max_position_embeddings=256)
    if arch == "llama":
        cfg = LlamaConfig(num_key_value_heads=2, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(**common)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_checkpoint(path: str, cfg, seed: int = 0, tokenizer: bool = True) -> str:
    """save_pretrained a random-weight model (and the bundled tokenizer) into `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    if tokenizer:
        from fuyou.data.tokenizer import DEFAULT_TOKENIZER_DIR

        for f in os.listdir(DEFAULT_TOKENIZER_DIR):
            with open(os.path.join(DEFAULT_TOKENIZER_DIR, f), "rb") as src, open(os.path.join(path, f), "wb") as dst:
                dst.write(src.read())
    return path


def random_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> List[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append(Batch(ids, ids.clone(), None))
    return out


def run_fuyou(ckpt, store_path, batches, micro, memory=None, trace=None, *, device="cpu", state=None, linear=None, optim=None):
    """Import `ckpt` into a fresh store and train one fuyou step per batch; (runtime, step results).
    `optim`: the OptimConfig (default: LR and WD, constant); the run's length is len(batches)."""
    from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, StateConfig
    from fuyou.model.importer import import_model
    from fuyou.model.skeleton import Skeleton
    from fuyou.model.source import ModelSource
    from fuyou.step.runtime import Runtime

    src = ModelSource(ckpt)
    store = import_model(src, store_path, state or StateConfig())
    rt = Runtime(
        store,
        Skeleton(src.config, linear=linear),
        device=torch.device(device),
        memory=memory or MemoryConfig(),
        batch=BatchConfig(batch_size=batches[0].input_ids.shape[0], micro_batches=micro, seq_len=batches[0].input_ids.shape[1]),
        optim=optim or OptimConfig(lr=LR, weight_decay=WD),
        trace=trace,
        total_steps=len(batches),
    )
    try:
        results = [rt.step(b) for b in batches]
    finally:
        rt.close()
    return rt, results


def reference_train(path: str, batches: List[Batch], micro_batches: int, *, lr: float, weight_decay: float = 0.0, max_grad_norm=None, device="cpu",
                    scheduler=None, betas=(0.9, 0.999), eps=1e-8):
    """Plain PyTorch: from_pretrained, torch.optim.AdamW, the same loss and accumulation as fuyou;
    `scheduler(optimizer)` -> a torch LR scheduler stepped after each optimizer step, as Trainer does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    sched = scheduler(opt) if scheduler is not None else None
    losses = []
    for batch in batches:
        total = count_targets(batch.labels)
        opt.zero_grad()
        loss = 0.0
        for mb in batch.split(micro_batches):
            mb = mb.to(device)
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits  # a training forward: no cache
            ls = causal_lm_loss_sum(logits, mb.labels)
            (ls / total).backward()
            loss += float(ls.detach())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss / total)
    return model, losses


def store_master_weights(store_path: str) -> dict:
    """{param name: fp32 tensor} of the store's live master weights."""
    from fuyou.optim.state import StateCodecs, decode_master
    from fuyou.store.directio import aligned_empty
    from fuyou.store.store import open_store

    store = open_store(store_path, StateCodecs.from_json)
    out = {}
    for b in store.block_names:
        lay = store.layouts[b].kinds["master"]
        buf = aligned_empty(lay.file_bytes)
        store.read(b, "master", buf)
        for name, parts in lay.views(buf).items():
            out[name] = decode_master(store.state.cfg, parts, dict(store.layouts[b].params)[name]).clone()
    return out


def assert_trains_like_pytorch(store_path: str, ckpt: str, batches, micro_batches: int, results, *, device="cpu", max_grad_norm=None,
                               rtol: float = 1e-5, atol: float = 1e-6):
    """fuyou's step losses and the store's final master weights equal plain PyTorch's (reference_train
    with LR/WD on `device`), element-wise within rtol/atol; and training moved the weights. Returns
    the trained reference model."""
    ref_model, ref_losses = reference_train(ckpt, batches, micro_batches, lr=LR, weight_decay=WD, max_grad_norm=max_grad_norm, device=device)
    torch.testing.assert_close(torch.tensor([r.loss for r in results]), torch.tensor(ref_losses), rtol=rtol, atol=atol)
    ref = dict(ref_model.named_parameters())
    got = store_master_weights(store_path)
    assert got, "the store holds no master weights"
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name].detach().cpu().reshape(-1), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    assert results[-1].loss != results[0].loss
    return ref_model
