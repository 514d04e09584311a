"""Checkpoints during training: loadable Hugging Face checkpoints of the committed weights every
--save-every steps, the newest --save-total-limit kept, never one that looks complete but is not."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpts")
    ckpt = save_checkpoint(str(tmp / "ckpt"), tiny_config("llama", vocab_size=640, num_hidden_layers=2))
    data = tmp / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"row {i}: words for a tiny model to learn"}) for i in range(60)))
    args = ["--model", ckpt, "--data", str(data), "--batch-size", "4", "--micro-batches", "2", "--seq-len", "16", "--device", "cpu"]
    return tmp, args


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_checkpoints_every_n_steps_load_and_reproduce_the_store(setup, tmp_path):
    _tmp, args = setup
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    assert main(["finetune", *args, "--store", store, "--steps", "4", "--output-dir", out, "--save-every", "2", "--save-total-limit", "1"]) == 0
    assert sorted(os.listdir(out)) == ["checkpoint-4"]  # checkpoint-2 was written, then dropped by the limit
    assert main(["export", "--store", store, "--to", str(tmp_path / "exported")]) == 0
    ids = torch.randint(0, 640, (2, 16), generator=torch.Generator().manual_seed(1))
    saved, store_logits = _logits(os.path.join(out, "checkpoint-4"), ids), _logits(str(tmp_path / "exported"), ids)
    torch.testing.assert_close(saved, store_logits, rtol=1e-5, atol=1e-5)
    # bf16 checkpoints: the same weights rounded to bf16; logits within what that rounding moves
    # (relative 2^-8 per weight through two layers: a few percent of the logits' scale).
    assert main(["export", "--store", store, "--to", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    bf16 = _logits(str(tmp_path / "bf16"), ids)
    assert (bf16 - store_logits).abs().max() <= 0.05 * store_logits.abs().max()


def test_a_killed_save_leaves_nothing_that_looks_complete(setup, tmp_path):
    _tmp, args = setup
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT, FUYOU_CRASH_AT="export:1")
    proc = subprocess.run([sys.executable, "-m", "fuyou.cli", "finetune", *args, "--store", store, "--steps", "2", "--output-dir", out,
                           "--save-every", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not [n for n in os.listdir(out) if n.startswith("checkpoint-") and ".partial-" not in n]
    assert main(["finetune", *args, "--store", store, "--resume", "--steps", "2"]) == 0  # the store is at step 1: resumes, saves
    # Step 1's save never completed: not there; its partial directory is gone with the next save.
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "model.safetensors.index.json"))
