"""Model import: sharded and bf16 checkpoints, presets, bounded memory, block partition."""
import os
import subprocess
import sys
import textwrap

import torch

from fuyou.config import StateConfig
from fuyou.model.importer import import_model
from fuyou.model.skeleton import EMBED, HEAD, Skeleton
from fuyou.model.source import ModelSource
from tests.helpers import save_checkpoint, store_master_weights, tiny_config


def checkpoint_tensors(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n: p.detach().reshape(-1) for n, p in m.named_parameters()}


def test_sharded_checkpoint_imports_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "ckpt"), max_shard_size="60KB")
    assert os.path.isfile(tmp_path / "ckpt" / "model.safetensors.index.json")
    import_model(ModelSource(str(tmp_path / "ckpt")), str(tmp_path / "store"), StateConfig())
    want = checkpoint_tensors(str(tmp_path / "ckpt"))
    got = store_master_weights(str(tmp_path / "store"))
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_bf16_checkpoint_becomes_exact_fp32_master(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "ckpt"))
    import_model(ModelSource(str(tmp_path / "ckpt")), str(tmp_path / "store"), StateConfig())
    got = store_master_weights(str(tmp_path / "store"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.detach().float().reshape(-1), rtol=0, atol=0)


def test_preset_runs_the_architecture_init(tmp_path):
    src = ModelSource("llama-tiny")
    import_model(src, str(tmp_path / "store"), StateConfig(), seed=3)
    got = store_master_weights(str(tmp_path / "store"))
    q = got["model.layers.0.self_attn.q_proj.weight"]
    std = src.config.initializer_range
    assert 0.9 * std < float(q.std()) < 1.1 * std and abs(float(q.mean())) < std / 10
    torch.testing.assert_close(got["model.norm.weight"], torch.ones_like(got["model.norm.weight"]), rtol=0, atol=0)
    # Same seed, same weights.
    import_model(src, str(tmp_path / "again"), StateConfig(), seed=3)
    torch.testing.assert_close(store_master_weights(str(tmp_path / "again"))["model.layers.0.self_attn.q_proj.weight"], q, rtol=0, atol=0)


def test_import_memory_stays_near_one_block(tmp_path):
    """Peak RSS growth while importing stays far below the checkpoint's size (never the whole model)."""
    cfg = tiny_config("llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=24, num_attention_heads=8, vocab_size=640)
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    layer_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 1376)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {root!r})
        from fuyou.config import StateConfig
        from fuyou.model.importer import import_model
        from fuyou.model.source import ModelSource
        src = ModelSource({ckpt!r})
        import torch, transformers  # everything imported before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        import_model(src, {str(tmp_path / "store")!r}, StateConfig())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < (1 << 30) + layer_bytes  # the bound: largest block + 1 GiB
    assert growth < 0.4 * ckpt_bytes, f"import grew RSS by {growth} B for a {ckpt_bytes} B checkpoint"


def test_block_partition_tied_and_untied():
    sk = Skeleton(tiny_config("llama", tie_word_embeddings=True))
    names = [b.name for b in sk.blocks]
    assert names[0] == EMBED and names[-1] == HEAD and len(names) == 3 + 2
    assert sk.block(HEAD).borrowed == [(EMBED, "model.embed_tokens.weight")]
    assert "lm_head.weight" not in sk.params  # one copy, owned by the embedding block
    untied = Skeleton(tiny_config("gpt_neox"))
    assert "lm_head.weight" in untied.block(HEAD).params and untied.block(HEAD).borrowed == []
    # Every parameter belongs to exactly one block.
    owned = [p for b in untied.blocks for p in b.params]
    assert sorted(owned) == sorted(untied.params)
    assert all(p.device.type == "meta" for p in untied.model.parameters())
