"""Mixture-of-experts checkpoints as save_pretrained writes them (one tensor per expert) import
through transformers' conversion mapping, train exactly, keep their stored buffers (DeepSeek-V3's
trained router bias) unchanged, and export in the same per-expert layout; the import stays within
the memory bound of one block."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fuyou.model.importer import import_model
from fuyou.model.source import ModelError, ModelSource
from fuyou.config import StateConfig
from tests.model import matrix
from tests.model.tiny_configs import tiny_config

MOE = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"]


@pytest.fixture(autouse=True)
def _quiet():
    matrix.quiet()


@pytest.mark.parametrize("model_type", MOE)
def test_per_expert_checkpoint_trains_exactly_and_exports_per_expert(tmp_path, model_type):
    ckpt = matrix._save(tiny_config(model_type), str(tmp_path / "ckpt"))
    keys = set(matrix._shards(ckpt))
    assert any(re.search(r"\.experts\.\d+\.", k) for k in keys), "save_pretrained no longer writes one tensor per expert"
    outcome = matrix.run_entry(model_type, str(tmp_path / "run"))  # exact losses and weights, clean export
    assert outcome.status == "pass", outcome.reason
    exported = set(matrix._shards(str(tmp_path / "run" / "export")))
    assert exported == keys  # the checkpoint's own layout: per-expert names, buffers included


def test_deepseek_v3_router_bias_is_imported_unchanged_and_used(tmp_path):
    """The checkpoint's trained e_score_correction_bias is what fuyou trains with and keeps: the loss
    with it differs from the loss with the bias the architecture initialises (zeros)."""
    from safetensors.torch import load_file, save_file

    from tests.helpers import random_batches, reference_train, run_fuyou

    ckpt = matrix._save(tiny_config("deepseek_v3"), str(tmp_path / "ckpt"))
    bias = {k: v for k, v in matrix._shards(ckpt).items() if k.endswith("e_score_correction_bias")}
    assert bias and all(float(v.abs().sum()) > 0 for v in bias.values())
    batches = random_batches(1, 4, 16, 128, seed=1)
    rt, results = run_fuyou(ckpt, str(tmp_path / "store"), batches, matrix.MICRO)
    for name, value in bias.items():
        torch.testing.assert_close(rt.ctx.skeleton.buffers()[name], value, rtol=0, atol=0)
    zeroed = str(tmp_path / "zeroed")
    os.makedirs(zeroed)
    for f in os.listdir(ckpt):
        data = open(os.path.join(ckpt, f), "rb").read()
        open(os.path.join(zeroed, f), "wb").write(data)
    shard = os.path.join(zeroed, "model.safetensors")
    tensors = load_file(shard)
    tensors.update({k: torch.zeros_like(v) for k, v in bias.items()})
    save_file(tensors, shard, metadata={"format": "pt"})
    _m, with_bias = reference_train(ckpt, batches, matrix.MICRO, lr=1e-3)
    _m, without = reference_train(zeroed, batches, matrix.MICRO, lr=1e-3)
    assert abs(with_bias[0] - without[0]) > 1e-4, "the router bias does not move the loss: the test proves nothing"
    torch.testing.assert_close(torch.tensor(results[0].loss), torch.tensor(with_bias[0]), rtol=1e-5, atol=1e-6)


def test_moe_import_memory_stays_near_one_block(tmp_path):
    """Fusing a layer's experts holds that layer only: peak RSS growth stays far below the checkpoint."""
    cfg = tiny_config("mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4, head_dim=64, num_local_experts=8)
    ckpt = matrix._save(cfg, str(tmp_path / "ckpt"))
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    layer_bytes = 4 * (8 * 3 * 256 * 512 + 4 * 256 * 256)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {root!r})
        from fuyou.model.importer import import_model
        from fuyou.model.source import ModelError, ModelSource
        from fuyou.config import StateConfig
        src = ModelSource({ckpt!r})
        import torch, transformers
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        import_model(src, {str(tmp_path / "store")!r}, StateConfig())
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < (1 << 30) + layer_bytes  # the import's bound: largest block + 1 GiB
    assert growth < 0.4 * ckpt_bytes, f"import grew RSS by {growth} B for a {ckpt_bytes} B checkpoint"


def test_checkpoint_without_an_expert_tensor_is_refused_with_its_name(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = matrix._save(tiny_config("qwen3_moe"), str(tmp_path / "ckpt"))
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    dropped = next(k for k in tensors if re.search(r"layers\.1\.mlp\.experts\.2\.gate_proj", k))  # fused with up_proj
    del tensors[dropped]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"layers\.1\.mlp\.experts"):
        import_model(ModelSource(ckpt), str(tmp_path / "store"), StateConfig())
