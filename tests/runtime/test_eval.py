"""Validation: the forward-only pass through the streaming runtime gives plain PyTorch's loss on the
same rows, and a run validates at --eval-every steps into metrics.jsonl."""
import json
import os

import pytest
import torch

from fuyou.config import MemoryConfig
from tests.helpers import LR, WD, random_batches, reference_train, run_fuyou, save_checkpoint, tiny_config
from fuyou.model.skeleton import causal_lm_loss_sum, count_targets


def _reference_eval(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return float(causal_lm_loss_sum(logits, batch.labels)) / count_targets(batch.labels)


@pytest.mark.parametrize("memory", [MemoryConfig(), MemoryConfig(recompute="always", cache_mem_bytes=0, prefetch_depth=0)], ids=["default", "streamed"])
def test_eval_loss_equals_plain_pytorch(tmp_path, memory):
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), tiny_config("llama"), tokenizer=False)
    batches = random_batches(2, 4, 16, 128)
    held_out = random_batches(1, 6, 16, 128, seed=9)[0]  # 6 rows: three micro-batches of 2, as a step splits 4 rows in 2
    rt, _results = run_fuyou(ckpt, str(tmp_path / "store"), batches, 2, memory)
    loss_sum, targets = rt.evaluate(held_out)
    rt.close()
    model, _losses = reference_train(ckpt, batches, 2, lr=LR, weight_decay=WD)
    assert targets == count_targets(held_out.labels)
    torch.testing.assert_close(torch.tensor(loss_sum / targets), torch.tensor(_reference_eval(model, held_out)), rtol=1e-5, atol=1e-6)
    assert rt.store.step == 2  # nothing committed by a validation


def test_a_run_validates_every_n_steps(tmp_path):
    from transformers import AutoModelForCausalLM

    from fuyou.cli import main
    from fuyou.data.dataset import TokenDataset
    from fuyou.data.tokenizer import load_tokenizer

    ckpt = save_checkpoint(str(tmp_path / "ckpt"), tiny_config("llama", vocab_size=640))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"record {i}: one two three four five six seven eight"}) for i in range(60)))
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--store", store, "--steps", "4", "--batch-size", "4", "--micro-batches", "2",
                 "--seq-len", "16", "--eval-split", "0.2", "--eval-every", "2", "--output-dir", out, "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(store, "metrics.jsonl"))]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    # The last validation equals plain PyTorch's loss of the final checkpoint on the held-out rows.
    _train, held_out = TokenDataset(str(data), load_tokenizer(ckpt), 16, seed=0).split(0.2)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-4"), dtype=torch.float32).eval()
    loss_sum = targets = 0
    for batch in held_out.in_order(4):
        with torch.no_grad():
            loss_sum += float(causal_lm_loss_sum(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels))
        targets += count_targets(batch.labels)
    torch.testing.assert_close(torch.tensor(evals[-1]["eval_loss"]), torch.tensor(loss_sum / targets), rtol=1e-5, atol=1e-6)
    assert evals[-1]["eval_perplexity"] == pytest.approx(torch.tensor(loss_sum / targets).exp().item(), rel=1e-5)


def test_tensorboard_gets_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is a dev dependency; without it --tensorboard is refused (tested below)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fuyou.cli import main

    ckpt = save_checkpoint(str(tmp_path / "ckpt"), tiny_config("llama", vocab_size=640))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"record {i}: one two three four five six seven eight"}) for i in range(60)))
    tb = str(tmp_path / "tb")
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--store", str(tmp_path / "s"), "--steps", "2", "--batch-size", "4",
                 "--seq-len", "16", "--eval-split", "0.2", "--tensorboard", tb, "--device", "cpu"]) == 0
    acc = EventAccumulator(tb)
    acc.Reload()
    rows = [json.loads(line) for line in open(tmp_path / "s" / "metrics.jsonl")]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows if "loss" in r])
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [2]


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    from fuyou.cli import main

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    capsys.readouterr()
    assert main(["finetune", "--store", str(tmp_path / "s"), "--steps", "1", "--tensorboard", str(tmp_path / "tb"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0], err
    assert not (tmp_path / "s").exists()  # refused before anything was written
