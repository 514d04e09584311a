"""Reliability: non-finite skip, exact clipping under overlap, disk faults, corruption, export."""
import errno
import json
import os
import subprocess

import pytest
import torch

from fuyou.cli import main
from fuyou.config import BatchConfig, MemoryConfig, OptimConfig, StateConfig
from fuyou.model.importer import import_model
from fuyou.model.skeleton import Skeleton
from fuyou.model.source import ModelSource
from fuyou.step.runtime import Runtime
from fuyou.store.directio import set_fault_hook
from tests.helpers import random_batches, reference_train, save_checkpoint, store_master_weights, tiny_config
from tests.runtime.test_exactness import ATOL, LR, RTOL, WD, run_fuyou

BAD_TOKEN = 5


def make_runtime(ckpt, store_path, batch, micro, **kw):
    src = ModelSource(ckpt)
    store = import_model(src, store_path, StateConfig())
    return Runtime(
        store,
        Skeleton(src.config),
        device=torch.device("cpu"),
        memory=MemoryConfig(),
        batch=BatchConfig(batch_size=batch.input_ids.shape[0], micro_batches=micro, seq_len=batch.input_ids.shape[1]),
        optim=OptimConfig(lr=LR, weight_decay=WD),
        **kw,
    )


def file_bytes(store_path):
    d = os.path.join(store_path, "blocks")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def test_non_finite_gradient_skips_the_step(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[BAD_TOKEN] = float("inf")  # any batch holding it overflows
    model.save_pretrained(str(tmp_path / "ckpt"))
    batches = random_batches(3, 4, 16, cfg.vocab_size, seed=5)
    for b in batches:
        b.input_ids[b.input_ids == BAD_TOKEN] = BAD_TOKEN + 1
        b.labels.copy_(b.input_ids)
    batches[1].input_ids[0, 3] = BAD_TOKEN
    rt = make_runtime(str(tmp_path / "ckpt"), str(tmp_path / "store"), batches[0], 2)
    try:
        r1 = rt.step(batches[0])
        rt.store.settle()  # step 0's superseded files are deleted off the step; wait for them before the snapshot
        before = file_bytes(str(tmp_path / "store"))
        manifest_before = json.load(open(tmp_path / "store" / "manifest.json"))
        r2 = rt.step(batches[1], train_meta={"data_position": 8})
        assert r2.status == "skipped" and r2.step == 1
        assert file_bytes(str(tmp_path / "store")) == before  # no state change, no leftovers
        after = json.load(open(tmp_path / "store" / "manifest.json"))
        assert after["step"] == manifest_before["step"] == 1 and after["train"] == {"data_position": 8}
        r3 = rt.step(batches[2])
        assert r1.status == r3.status == "ok" and r3.step == 2
    finally:
        rt.close()
    # Training continued exactly as if the bad batch had never been there.
    ref, losses = reference_train(str(tmp_path / "ckpt"), [batches[0], batches[2]], 2, lr=LR, weight_decay=WD)
    torch.testing.assert_close(torch.tensor([r1.loss, r3.loss]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    params = dict(ref.named_parameters())
    for name, value in store_master_weights(str(tmp_path / "store")).items():
        torch.testing.assert_close(value, params[name].detach().reshape(-1), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("max_norm", [0.05, 1e6], ids=["clipping", "no-clipping"])
def test_clipping_under_overlap_matches_clip_grad_norm(tmp_path, max_norm):
    cfg = tiny_config("qwen2")
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg, tokenizer=False)
    batches = random_batches(4, 4, 16, cfg.vocab_size, seed=6)
    rt = make_runtime(ckpt, str(tmp_path / "store"), batches[0], 2, max_grad_norm=max_norm)
    try:
        results = [rt.step(b) for b in batches]
    finally:
        rt.close()
    assert {r.status for r in results} == ({"clipped"} if max_norm < 1 else {"ok"})
    ref, losses = reference_train(ckpt, batches, 2, lr=LR, weight_decay=WD, max_grad_norm=max_norm)
    torch.testing.assert_close(torch.tensor([r.loss for r in results]), torch.tensor(losses), rtol=RTOL, atol=ATOL)
    params = dict(ref.named_parameters())
    for name, value in store_master_weights(str(tmp_path / "store")).items():
        torch.testing.assert_close(value, params[name].detach().reshape(-1), rtol=RTOL, atol=ATOL)
    assert not [f for f in os.listdir(tmp_path / "store" / "blocks") if ".grad." in f]  # kept gradients removed at commit


@pytest.fixture
def cli_setup(tmp_path):
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), tiny_config("llama", vocab_size=640))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"One plus two is three. Step {i}."}) for i in range(60)))
    args = ["--model", ckpt, "--data", str(data), "--batch-size", "2", "--micro-batches", "1", "--seq-len", "16"]
    return tmp_path, args


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_disk_fault_stops_cleanly_and_resumes(cli_setup, capsys, err):
    tmp_path, args = cli_setup
    store = str(tmp_path / "store")
    assert main(["finetune", *args, "--store", store, "--steps", "2"]) == 0
    good = file_bytes(store)
    calls = []

    def hook(op, path, offset, nbytes):
        calls.append(op)
        if op == "write" and len([c for c in calls if c == "write"]) == 3:
            raise OSError(err, f"{op} of {path} at offset {offset} failed: {os.strerror(err)}")

    capsys.readouterr()
    set_fault_hook(hook)
    try:
        code = main(["finetune", *args, "--store", store, "--resume", "--steps", "3"])  # --steps: the run's total
    finally:
        set_fault_hook(None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("fuyou: error: ")
    assert os.strerror(err) in lines[-1] and "still holds step 2" in lines[-1] and "--resume" in lines[-1]
    assert file_bytes(store) == good  # the last committed step is intact, nothing half-written left
    assert main(["finetune", *args, "--store", store, "--resume", "--steps", "3"]) == 0
    assert json.load(open(os.path.join(store, "manifest.json")))["step"] == 3


def test_real_enospc_on_a_small_filesystem(cli_setup, capsys):
    tmp_path, args = cli_setup
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    try:
        store = str(mnt / "store")
        code = main(["finetune", *args, "--store", store, "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        # Refused before the first byte, with the space the run's peak needs.
        assert code == 2 and "not enough free disk" in err[-1] and "needed at the peak" in err[-1], err
        assert not os.path.exists(store)  # nothing made
    finally:
        subprocess.run(["umount", str(mnt)])


def test_corrupted_block_is_detected(cli_setup, capsys):
    tmp_path, args = cli_setup
    store = str(tmp_path / "store")
    assert main(["finetune", *args, "--store", store, "--steps", "1"]) == 0
    victim = sorted(f for f in os.listdir(os.path.join(store, "blocks")) if f.startswith("layer0001.weights"))[0]
    path = os.path.join(store, "blocks", victim)
    raw = bytearray(open(path, "rb").read())
    raw[100] ^= 0xFF
    open(path, "wb").write(raw)
    capsys.readouterr()
    assert main(["finetune", *args, "--store", store, "--resume", "--steps", "2"]) == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert "corrupted" in msg and victim in msg
    raw[100] ^= 0xFF  # restored: the store is resumable again
    open(path, "wb").write(raw)
    assert main(["finetune", *args, "--store", store, "--resume", "--steps", "2"]) == 0


def test_export_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("gpt_neox")
    ckpt = save_checkpoint(str(tmp_path / "ckpt"), cfg)
    batches = random_batches(2, 4, 16, cfg.vocab_size, seed=7)
    rt, _ = run_fuyou(ckpt, str(tmp_path / "store"), batches, 2)
    assert main(["export", "--store", str(tmp_path / "store"), "--to", str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ref, _ = reference_train(ckpt, batches, 2, lr=LR, weight_decay=WD)
    ids = random_batches(1, 2, 16, cfg.vocab_size, seed=8)[0].input_ids
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ref.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    # A non-empty target is refused.
    assert main(["export", "--store", str(tmp_path / "store"), "--to", str(tmp_path / "out")]) == 2


def test_sigterm_stops_after_the_step_in_flight(cli_setup):
    import signal
    import sys
    import time

    tmp_path, args = cli_setup
    store = str(tmp_path / "store")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-m", "fuyou.cli", "finetune", *args, "--store", store, "--steps", "500"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while committed_step(store) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # stopped before its target: the shell's code for SIGTERM
    assert "stopped by SIGTERM" in err and "--resume" in err
    step = committed_step(store)
    assert 2 <= step < 500
    assert main(["finetune", *args, "--store", store, "--resume", "--steps", str(step + 1)]) == 0
    assert committed_step(store) == step + 1


def committed_step(store):
    path = os.path.join(store, "manifest.json")
    if not os.path.exists(path):
        return 0
    try:
        return json.load(open(path))["step"]
    except (json.JSONDecodeError, OSError):  # read while being replaced: ask again
        return 0
