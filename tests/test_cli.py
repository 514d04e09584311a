"""`fuyou finetune`: bad input gives one line naming the fix, exit 2, and leaves the store untouched."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config

SMALL = ["--steps", "1", "--batch-size", "2", "--micro-batches", "1", "--seq-len", "16"]


def tree_digest(path) -> str:
    """Hash of every file name and content under path ('absent' if it does not exist)."""
    if not os.path.exists(path):
        return "absent"
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("m") / "ckpt"), tiny_config("llama", vocab_size=640))


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"Counting up: one, two, three, four, five, number {i}."}) for i in range(40)))
    return str(p)


def run_bad(capsys, argv, store):
    before = tree_digest(store)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fuyou: error: "), err
    assert tree_digest(store) == before, "the store was modified"
    return err[0]


def test_missing_model_dir(tmp_path, capsys, data):
    store = str(tmp_path / "store")
    msg = run_bad(capsys, ["finetune", "--model", str(tmp_path / "nope"), "--data", data, "--store", store] + SMALL, store)
    assert "does not exist" in msg and "model directory" in msg


def test_model_path_is_a_file_or_lacks_config(tmp_path, capsys, data):
    f = tmp_path / "file"
    f.write_text("x")
    store = str(tmp_path / "store")
    assert "not a directory" in run_bad(capsys, ["finetune", "--model", str(f), "--data", data, "--store", store] + SMALL, store)
    (tmp_path / "empty").mkdir()
    assert "config.json" in run_bad(capsys, ["finetune", "--model", str(tmp_path / "empty"), "--data", data, "--store", store] + SMALL, store)


def test_unreadable_config(tmp_path, capsys, data):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    store = str(tmp_path / "store")
    assert "cannot be read" in run_bad(capsys, ["finetune", "--model", str(d), "--data", data, "--store", store] + SMALL, store)


def test_not_a_causal_lm(tmp_path, capsys, data):
    from transformers import T5Config

    d = tmp_path / "t5"
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100).save_pretrained(str(d))
    from safetensors.torch import save_file

    save_file({"shared.weight": torch.zeros(100, 32)}, str(d / "model.safetensors"))
    store = str(tmp_path / "store")
    msg = run_bad(capsys, ["finetune", "--model", str(d), "--data", data, "--store", store] + SMALL, store)
    assert "causal" in msg


def test_corrupt_safetensors(tmp_path, capsys, data, ckpt):
    d = tmp_path / "corrupt"
    d.mkdir()
    for f in os.listdir(ckpt):
        (d / f).write_bytes(open(os.path.join(ckpt, f), "rb").read())
    (d / "model.safetensors").write_bytes(b"\x01\x00")
    store = str(tmp_path / "store")
    assert "not a readable safetensors" in run_bad(capsys, ["finetune", "--model", str(d), "--data", data, "--store", store] + SMALL, store)


def test_pickled_checkpoint_is_refused(tmp_path, capsys, data, ckpt):
    d = tmp_path / "binonly"
    d.mkdir()
    for f in os.listdir(ckpt):
        if not f.endswith(".safetensors"):
            (d / f).write_bytes(open(os.path.join(ckpt, f), "rb").read())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not-to-be-unpickled")
    store = str(tmp_path / "store")
    msg = run_bad(capsys, ["finetune", "--model", str(d), "--data", data, "--store", store] + SMALL, store)
    assert "never unpickles" in msg and "safe_serialization" in msg


def test_missing_and_empty_data(tmp_path, capsys, ckpt):
    store = str(tmp_path / "store")
    assert "does not exist" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", str(tmp_path / "none.jsonl"), "--store", store] + SMALL, store)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no examples" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", str(empty), "--store", store] + SMALL, store)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    assert "bad.jsonl:2" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", str(bad), "--store", store] + SMALL, store)


def test_store_is_a_file_or_not_writable(tmp_path, capsys, ckpt, data):
    f = tmp_path / "storefile"
    f.write_text("mine")
    assert "is a file" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", str(f)] + SMALL, str(f))
    ro = "/proc/fuyou-store-test"  # unwritable even for root
    assert "not writable" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", ro] + SMALL, ro)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    assert "not a fuyou store" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", str(other)] + SMALL, str(other))


def test_budget_too_small_names_the_minimum(tmp_path, capsys, ckpt, data):
    store = str(tmp_path / "store")
    msg = run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", store, "--cpu-mem", "64KiB"] + SMALL, store)
    assert "--cpu-mem" in msg and "too small" in msg and "pass --cpu-mem" in msg
    msg = run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", store, "--gpu-mem", "4KiB"] + SMALL, store)
    assert "--gpu-mem" in msg and "pass --gpu-mem" in msg


def test_store_of_another_model_and_existing_store(tmp_path, capsys, ckpt, data):
    store = str(tmp_path / "store")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store] + SMALL) == 0
    capsys.readouterr()
    other = save_checkpoint(str(tmp_path / "other"), tiny_config("llama", vocab_size=640, num_hidden_layers=2))
    capsys.readouterr()
    assert "another model" in run_bad(capsys, ["finetune", "--model", other, "--data", data, "--store", store] + SMALL, store)
    assert "--resume" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", store] + SMALL, store)
    # --resume continues from the committed step, to the total --steps.
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store, "--resume"] + SMALL[2:] + ["--steps", "2"]) == 0
    assert json.load(open(os.path.join(store, "manifest.json")))["step"] == 2


def test_bad_flags(tmp_path, capsys, ckpt, data):
    store = str(tmp_path / "store")
    assert "divisible" in run_bad(capsys, ["finetune", "--model", ckpt, "--data", data, "--store", store, "--batch-size", "3", "--micro-batches", "2"], store)
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--gpu-mem", "lots"])
    assert exc.value.code == 2


def test_default_run_loss_goes_down(tmp_path):
    """`fuyou finetune` with no arguments: the default job, as the README's first command runs it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fuyou.cli", "finetune"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = [l for l in proc.stderr.splitlines() if l.startswith("done:")]
    assert done, proc.stderr[-2000:]
    first, last = (float(x) for x in done[0].split("loss ")[1].split(";")[0].split(" -> "))
    assert last < 0.6 * first, done[0]
    assert os.path.isfile(tmp_path / "fuyou-store" / "manifest.json")


def test_unknown_flag_gets_the_subcommands_usage(capsys):
    assert main(["finetune", "--stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fuyou finetune") and "--steps" in err
    assert err.strip().splitlines()[-1] == "fuyou: error: unrecognized arguments: --stepz 3; see `fuyou finetune --help`"
