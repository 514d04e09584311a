"""fuyou finetune --config: a file of settings in fuyou.config's layout, flags overriding it;
--print-config writes the same layout back."""
import json
import os

import pytest

from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config

SHAPE = ["--batch-size", "4", "--micro-batches", "2", "--seq-len", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfgfile")
    ckpt = save_checkpoint(str(tmp / "ckpt"), tiny_config("llama", vocab_size=640, num_hidden_layers=2))
    data = tmp / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"row {i}: a few words to train a tiny model on"}) for i in range(60)))
    return ckpt, str(data)


def record(store):
    with open(os.path.join(store, "manifest.json")) as f:
        settings = json.load(f)["train"]["run"]["settings"]
    return {k: v for k, v in settings.items() if k != "store"}


def test_a_config_file_and_the_same_flags_store_the_same_run(ckpt_and_data, tmp_path):
    ckpt, data = ckpt_and_data
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{ckpt}"\ndata = "{data}"\nsteps = 2\nseed = 5\n'
                   '[optim]\nlr = 5e-4\nlr_scheduler = "cosine"\nwarmup_steps = 1\nweight_decay = 0.1\n'
                   '[batch]\nbatch_size = 4\nmicro_batches = 2\nseq_len = 16\n[memory]\ncpu_mem = "64MiB"\nprefetch_depth = 1\n')
    assert main(["finetune", "--config", str(cfg), "--store", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert main(["finetune", "--model", ckpt, "--data", data, "--steps", "2", "--seed", "5", "--lr", "5e-4", "--lr-scheduler", "cosine",
                 "--warmup-steps", "1", "--weight-decay", "0.1", "--cpu-mem", "64MiB", "--prefetch-depth", "1", "--store", str(tmp_path / "b"),
                 *SHAPE]) == 0
    a, b = record(str(tmp_path / "a")), record(str(tmp_path / "b"))
    assert a == b and a["optim.lr_scheduler"] == "cosine" and a["memory.cpu_mem_bytes"] == 64 << 20


def test_flags_override_the_file_and_print_config_round_trips(ckpt_and_data, tmp_path, capsys):
    ckpt, data = ckpt_and_data
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{ckpt}"\ndata = "{data}"\n[batch]\nseq_len = 32\n[optim]\nlr = 1e-4\n')
    store = str(tmp_path / "s")
    capsys.readouterr()
    assert main(["finetune", "--config", str(cfg), "--store", store, "--seq-len", "16", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "seq_len = 16" in printed and "lr = 0.0001" in printed and not os.path.exists(store)  # printing writes nothing
    again = tmp_path / "again.toml"
    again.write_text(printed)
    assert main(["finetune", "--config", str(again), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("text,match", [("stepz = 3\n", "unknown setting 'stepz'"), ("steps = \"three\"\n", "steps = 'three' is not a int"),
                                        ("[memory]\ncpu_mem = \"lots\"\n", "cannot read size"), ("steps = [\n", "not valid TOML"),
                                        ("[optim]\nlr_scheduler = \"sometimes\"\n", "choose one of")])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, match):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    capsys.readouterr()
    assert main(["finetune", "--config", str(cfg), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuyou: error: --config") and match in err[0], err
    assert not os.path.exists(tmp_path / "s")


def test_yaml_config(ckpt_and_data, tmp_path, capsys):
    ckpt, data = ckpt_and_data
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {ckpt}\ndata: {data}\nbatch:\n  seq_len: 16\n")
    capsys.readouterr()
    try:
        import yaml  # noqa: F401
    except ImportError:
        assert main(["finetune", "--config", str(cfg), "--print-config"]) == 2
        assert "pyyaml" in capsys.readouterr().err
        return
    assert main(["finetune", "--config", str(cfg), "--print-config"]) == 0
    assert "seq_len = 16" in capsys.readouterr().out
