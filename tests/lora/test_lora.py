"""LoRA on a streamed frozen base: fuyou in fp32 trains adapters exactly like peft.get_peft_model +
torch.optim.AdamW on the same batches, reads only the base's weights, writes nothing of it."""
import os

import pytest
import torch

from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, PeftConfig, StateConfig
from tests.helpers import random_batches, save_checkpoint, tiny_config
from fuyou.model.skeleton import causal_lm_loss_sum, count_targets

peft = pytest.importorskip("peft", reason="LoRA runs need the peft package (a dev dependency)")

LR, WD, STEPS, MICRO = 3e-3, 0.1, 3, 2
LORA = dict(r=4, alpha=8.0, target_modules="q_proj,v_proj")


def _initial_adapter(ckpt, directory, targets):
    """A peft adapter with random A and B (B non-zero, so the first step already sees the adapters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(directory)
    return directory


def _reference(ckpt, adapter_dir, batches, max_grad_norm=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), adapter_dir, is_trainable=True).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    losses = []
    for batch in batches:
        total, loss = count_targets(batch.labels), 0.0
        opt.zero_grad()
        for mb in batch.split(MICRO):
            ls = causal_lm_loss_sum(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits, mb.labels)
            (ls / total).backward()
            loss += float(ls.detach())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        losses.append(loss / total)
    return model, losses


def _fuyou(ckpt, tmp_path, adapter_dir, batches, memory, max_grad_norm=None, targets=LORA["target_modules"]):
    from safetensors.torch import load_file

    from fuyou.lora import run as run_dir
    from fuyou.lora.adapters import Adapters
    from fuyou.lora.trainer import LoraTrainer
    from fuyou.model.importer import import_model
    from fuyou.model.skeleton import Skeleton
    from fuyou.model.source import ModelSource
    from fuyou.step.runtime import Runtime

    src = ModelSource(ckpt)
    store = import_model(src, str(tmp_path / "base"), StateConfig(), weights_only=True)
    sk = Skeleton(src.config)
    optim = OptimConfig(lr=LR, weight_decay=WD)
    rt = Runtime(store, sk, device=torch.device("cpu"), memory=memory, batch=BatchConfig(batch_size=4, micro_batches=MICRO, seq_len=16),
                 optim=optim, total_steps=len(batches), frozen=True)
    adapters = Adapters(sk, PeftConfig(method="lora", r=LORA["r"], alpha=LORA["alpha"], target_modules=targets), torch.device("cpu"))
    adapters.load(load_file(os.path.join(adapter_dir, "adapter_model.safetensors")), adapter_dir)
    os.makedirs(tmp_path / "run")
    trainer = LoraTrainer(rt, adapters, optim=optim, max_grad_norm=max_grad_norm, root=str(tmp_path / "run"), base=run_dir.base_of(store),
                          manifest=None)
    written = store.bytes_written  # the import's
    try:
        results = [trainer.step(b, {}) for b in batches]
    finally:
        rt.close()
    assert store.bytes_written == written  # training wrote nothing of the base
    return store, adapters, results


ARCHS = {"llama": tiny_config("llama"), "qwen2": tiny_config("qwen2")}


def _moe_config():
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("memory", [MemoryConfig(), MemoryConfig(recompute="always", cache_mem_bytes=0, prefetch_depth=0)], ids=["kept", "streamed"])
def test_lora_trains_exactly_like_peft(tmp_path, arch, memory):
    cfg = _moe_config() if arch == "mixtral" else ARCHS[arch]
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    adapter_dir = _initial_adapter(ckpt, str(tmp_path / "init"), LORA["target_modules"].split(","))
    batches = random_batches(STEPS, 4, 16, 128)
    store, adapters, results = _fuyou(ckpt, tmp_path, adapter_dir, batches, memory, max_grad_norm=0.05)
    ref_model, ref_losses = _reference(ckpt, adapter_dir, batches, max_grad_norm=0.05)
    torch.testing.assert_close(torch.tensor([r.loss for r in results]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    ref = {n.replace(".default", ""): p for n, p in ref_model.named_parameters() if "lora_" in n}
    got = adapters.state()
    assert set(got) == set(ref)
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name].detach(), rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert results[-1].loss != results[0].loss and any(r.status == "clipped" for r in results)
    # The base is only read: nothing of it written, its store still at step 0.
    assert store.step == 0 and store.kinds == ("weights",) and all(r.bytes_written == 0 for r in results)
    if memory.cache_mem_bytes == 0:  # every step reads the layers' weights twice (forward, backward), nothing else
        weights = {b: lay.kinds["weights"].nbytes for b, lay in store.layouts.items()}
        # The embedding and the head once: a frozen base has no embedding backward, and the head's
        # forward and backward are one consumer.
        assert [r.bytes_read for r in results] == [2 * sum(weights.values()) - weights["embed"] - weights["head"]] * STEPS


def test_a_saved_adapter_loads_in_peft_and_reproduces_the_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = save_checkpoint(str(tmp_path / "ckpt"), ARCHS["llama"], tokenizer=False)
    adapter_dir = _initial_adapter(ckpt, str(tmp_path / "init"), ["q_proj", "v_proj"])
    batches = random_batches(2, 4, 16, 128)
    store, adapters, _results = _fuyou(ckpt, tmp_path, adapter_dir, batches, MemoryConfig())
    adapters.save_peft(str(tmp_path / "saved"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), str(tmp_path / "saved")).eval()
    ref_model, _losses = _reference(ckpt, adapter_dir, batches)
    ids = batches[0].input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
