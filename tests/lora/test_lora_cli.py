"""`fuyou finetune --peft lora` as a user runs it: a weights-only base, a run directory that resumes
bit-identically, two runs on one base, PEFT checkpoints, a merged export."""
import json
import os

import pytest
import torch

from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config

pytest.importorskip("peft", reason="LoRA runs need the peft package (a dev dependency)")

RUN = ["--peft", "lora", "--lora-r", "4", "--lora-alpha", "16", "--target-modules", "q_proj,v_proj", "--batch-size", "4", "--micro-batches", "2",
       "--seq-len", "16", "--lr", "2e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    ckpt = save_checkpoint(str(tmp / "ckpt"), tiny_config("llama", vocab_size=640, num_hidden_layers=2))
    data = tmp / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i}: the fox and the dog went for a walk"}) for i in range(80)))
    base = str(tmp / "base")
    assert main(["finetune", "--model", ckpt, "--data", str(data), "--store", base, "--run-dir", str(tmp / "first"), "--steps", "1", *RUN]) == 0
    return tmp, ckpt, str(data), base


def _state(run):
    m = json.load(open(os.path.join(run, "manifest.json")))
    return m["step"], m["state_crc32"], m["train"]["data_position"]


def test_the_base_holds_weights_only(setup):
    _tmp, _ckpt, _data, base = setup
    m = json.load(open(os.path.join(base, "manifest.json")))
    assert m["state"]["kinds"] == ["weights"] and all(set(b["versions"]) == {"weights"} for b in m["blocks"])
    assert {f.split(".")[1] for f in os.listdir(os.path.join(base, "blocks"))} == {"weights"}


def test_a_lora_run_resumes_bit_identically_from_its_run_directory(setup, capsys):
    tmp, ckpt, data, base = setup
    lone, split = str(tmp / "lone"), str(tmp / "split")
    common = ["--model", ckpt, "--data", data, "--store", base, *RUN]
    assert main(["finetune", *common, "--run-dir", lone, "--steps", "4"]) == 0
    assert main(["finetune", *common, "--run-dir", split, "--steps", "2"]) == 0
    assert main(["finetune", "--peft", "lora", "--run-dir", split, "--resume", "--steps", "4", "--device", "cpu"]) == 0  # the run knows the rest
    assert _state(split) == _state(lone)
    capsys.readouterr()
    assert main(["finetune", "--peft", "lora", "--run-dir", split, "--resume", "--steps", "5", "--lora-r", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-r 8 differs" in err[0], err


def test_checkpoints_are_peft_adapters_and_export_merges(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _tmp, ckpt, data, base = setup
    run, out = str(tmp_path / "run"), str(tmp_path / "ckpts")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", base, "--run-dir", run, "--steps", "3", "--output-dir", out,
                 "--save-every", "2", *RUN]) == 0
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    adapter = os.path.join(out, "checkpoint-3")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), adapter).eval()
    merged = str(tmp_path / "merged")
    assert main(["export", "--run-dir", run, "--to", merged, "--merge"]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 640, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_two_runs_train_on_one_base_and_the_base_is_locked_against_writers(setup, tmp_path, capsys):
    import fcntl

    _tmp, ckpt, data, base = setup
    fd = os.open(os.path.join(base, ".fuyou-lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # another adapter run reading the base
    try:
        assert main(["finetune", "--model", ckpt, "--data", data, "--store", base, "--run-dir", str(tmp_path / "r"), "--steps", "1", *RUN]) == 0
        capsys.readouterr()
        assert main(["export", "--store", base, "--to", str(tmp_path / "x")]) == 2  # a writer-class command waits for the readers
        assert "in use" in capsys.readouterr().err
    finally:
        os.close(fd)


def test_the_device_budget_holds_the_adapters_first(setup, tmp_path, capsys):
    """--gpu-mem counts the adapters and their AdamW state (16 B/param, outside the streaming pool):
    a budget that cannot hold them is refused before anything is written; one that can leaves the
    pool what they do not take."""
    from fuyou.lora.adapters import adapter_numel
    from fuyou.lora.job import _base_memory
    from fuyou.config import FinetuneConfig, MemoryConfig, PeftConfig
    from fuyou.model.skeleton import Skeleton
    from transformers import AutoConfig

    _tmp, ckpt, data, base = setup
    peft = PeftConfig(method="lora", r=4, target_modules="q_proj,v_proj")
    adapters = 16 * adapter_numel(Skeleton(AutoConfig.from_pretrained(ckpt)), peft)
    cfg = FinetuneConfig(peft=peft, memory=MemoryConfig(gpu_mem_bytes=adapters + 12345))
    assert _base_memory(cfg, Skeleton(AutoConfig.from_pretrained(ckpt)), torch.device("cpu")).gpu_mem_bytes == 12345
    run = str(tmp_path / "run")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", base, "--run-dir", run, "--steps", "1", *RUN, "--gpu-mem", "1KiB"]) == 2
    assert "cannot hold the adapters and their AdamW state" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(run, "manifest.json"))
