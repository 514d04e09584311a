"""A run is its store: --resume restores every recorded setting, refuses a changed one, takes the
changeable ones; --steps is a total; one writer per store; exit codes a script can trust."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fuyou.cli import main
from fuyou.cli.args import settings
from fuyou.cli.commands import FinetuneCommand
from fuyou.resume import NOT_RECORDED, is_changeable
from tests.helpers import save_checkpoint, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
RUN = ["--batch-size", "4", "--micro-batches", "2", "--seq-len", "16", "--lr", "5e-4", "--seed", "3", "--warmup-steps", "2",
       "--weight-decay", "0.1", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    ckpt = save_checkpoint(str(tmp / "ckpt"), tiny_config("llama", vocab_size=640))
    data = str(tmp / "d.jsonl")
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": f"record {i}: " + "the quick brown fox jumps over the lazy dog " * 3}) + "\n")
    return tmp, ckpt, data


def manifest(store):
    with open(os.path.join(store, "manifest.json")) as f:
        return json.load(f)


def state_of(store):
    """What must be bit-identical between two runs: every block file's checksum, the step, the data position."""
    m = manifest(store)
    return m["step"], m["train"]["data_position"], [(b["name"], b["versions"], b["crc32"]) for b in m["blocks"]]


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuyou: error: "), err
    return err[0]


def test_resume_with_only_the_store_continues_bit_identically(setup, tmp_path, capsys):
    _tmp, ckpt, data = setup
    lone, split = str(tmp_path / "lone"), str(tmp_path / "split")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", lone, "--steps", "4", *RUN]) == 0
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", split, "--steps", "2", *RUN]) == 0
    assert manifest(split)["step"] == 2
    # Only --store (and the new target): model, data, batch, lr schedule, seed all come from the store.
    assert main(["finetune", "--store", split, "--resume", "--steps", "4"]) == 0
    assert state_of(split) == state_of(lone)
    # At its target: says so, exits 0, changes nothing.
    before = state_of(split)
    capsys.readouterr()
    assert main(["finetune", "--store", split, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err and state_of(split) == before


# Every recorded setting with a flag, changed: (flag, a value other than the run's).
CHANGED = {
    "model": None,  # another checkpoint, made in the test
    "data": None,  # another file, made in the test
    "seed": "4", "max_grad_norm": "1.0", "disk_mode": "lean", "linear": "mxfp4",
    "state.weights": "bf16", "state.master": "bf16+rem", "state.states": "fp8",
    "optim.lr": "0.001", "optim.weight_decay": "0.2", "optim.warmup_steps": "3", "optim.lr_scheduler": "cosine", "optim.warmup_ratio": "0.1",
    "optim.min_lr_rate": "0.5", "optim.beta1": "0.8", "optim.beta2": "0.99", "optim.eps": "1e-06",
    "batch.batch_size": "8", "batch.micro_batches": "4", "batch.seq_len": "32", "eval.split": "0.2",
}


def test_the_refused_list_covers_every_recorded_setting():
    recorded = {s.dest[len("job."):] for s in settings(FinetuneCommand) if s.dest.startswith("job.")}
    # The adapters' settings are a LoRA run's (tests/lora checks their resume); --peft picks that kind of run.
    recorded = {p for p in recorded if p not in NOT_RECORDED and not is_changeable(p) and not p.startswith("peft.")}
    assert recorded == set(CHANGED)


@pytest.fixture(scope="module")
def run_store(setup):
    tmp, ckpt, data = setup
    store = str(tmp / "run")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store, "--steps", "1", *RUN]) == 0
    return store


@pytest.mark.parametrize("path", sorted(CHANGED))
def test_a_changed_setting_is_refused_naming_both_values(setup, run_store, capsys, path):
    tmp, _ckpt, data = setup
    from fuyou.config import FinetuneConfig, flag_of
    from fuyou.resume import field_at

    flag = flag_of(field_at(FinetuneConfig, path))
    value = CHANGED[path]
    if path == "model":
        value = save_checkpoint(str(tmp / "other"), tiny_config("llama", vocab_size=640, num_hidden_layers=2))
    if path == "data":
        value = str(tmp / "other.jsonl")
        with open(value, "w") as f:
            f.write(json.dumps({"text": "other data " * 40}) + "\n")
    before = open(os.path.join(run_store, "manifest.json")).read()
    capsys.readouterr()
    line = one_line_error(capsys, ["finetune", "--store", run_store, "--resume", "--steps", "2", flag, value])
    assert flag in line and (path == "model" or value in line), line
    assert open(os.path.join(run_store, "manifest.json")).read() == before  # nothing written


def test_changeable_settings_are_taken_and_recorded(setup, tmp_path):
    _tmp, ckpt, data = setup
    store = str(tmp_path / "s")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store, "--steps", "1", *RUN]) == 0
    assert main(["finetune", "--store", store, "--resume", "--steps", "2", "--cpu-mem", "64MiB", "--prefetch-depth", "1", "--io-backend", "python",
                 "--no-verify", "--cache-mem", "0"]) == 0
    got = manifest(store)["train"]["run"]["settings"]
    assert (got["steps"], got["memory.cpu_mem_bytes"], got["memory.prefetch_depth"], got["io_backend"], got["verify_reads"]) == (2, 64 << 20, 1, "python", False)
    assert got["batch.seq_len"] == 16 and got["optim.lr"] == 5e-4  # the run's own, restored
    # The same data, moved, is the run's data: taken and recorded.
    moved = str(tmp_path / "moved.jsonl")
    os.rename(data, moved)
    try:
        assert main(["finetune", "--store", store, "--resume", "--steps", "3", "--data", moved]) == 0
        assert manifest(store)["train"]["run"]["settings"]["data"] == moved
    finally:
        os.rename(moved, data)


def test_changed_data_needs_data_changed_ok(setup, tmp_path, capsys):
    _tmp, ckpt, _data = setup
    data = str(tmp_path / "d.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"text": "some text to train on " * 30}) + "\n")
    store = str(tmp_path / "s")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store, "--steps", "1", *RUN]) == 0
    with open(data, "a") as f:
        f.write(json.dumps({"text": "a record added later " * 30}) + "\n")
    capsys.readouterr()
    assert "--data-changed-ok" in one_line_error(capsys, ["finetune", "--store", store, "--resume", "--steps", "2"])
    assert main(["finetune", "--store", store, "--resume", "--steps", "2", "--data-changed-ok"]) == 0
    assert manifest(store)["step"] == 2


def test_a_local_model_needs_data(setup, tmp_path, capsys):
    _tmp, ckpt, _data = setup
    store = str(tmp_path / "s")
    line = one_line_error(capsys, ["finetune", "--model", ckpt, "--store", store, "--steps", "1", *RUN])
    assert "--data is required" in line and "--data builtin" in line
    assert not os.path.exists(store)  # nothing made
    assert main(["finetune", "--model", ckpt, "--data", "builtin", "--store", store, "--steps", "1", *RUN]) == 0


def _start(argv):
    return subprocess.Popen([sys.executable, "-m", "fuyou.cli", "finetune", *argv], env=ENV, stderr=subprocess.PIPE, text=True)


def _wait_for_step(store, proc, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if manifest(store)["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"the run did not reach step {step}")


def test_one_writer_per_store(setup, tmp_path):
    _tmp, ckpt, data = setup
    store, lone = str(tmp_path / "s"), str(tmp_path / "lone")
    argv = ["--model", ckpt, "--data", data, "--steps", "150", *RUN]  # long enough to still hold the lock when the second starts
    first = _start([*argv, "--store", store])
    _wait_for_step(store, first, 1)
    t0 = time.time()
    second = subprocess.run([sys.executable, "-m", "fuyou.cli", "finetune", "--store", store, "--resume"], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2 and time.time() - t0 < 60
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and f"in use by process {first.pid}" in err[0], err
    _out, err_first = first.communicate(timeout=600)
    assert first.returncode == 0, err_first[-2000:]
    assert main(["finetune", *argv, "--store", lone]) == 0
    assert state_of(store) == state_of(lone)


def test_a_killed_holders_lock_is_taken_over(setup, tmp_path):
    _tmp, ckpt, data = setup
    store = str(tmp_path / "s")
    first = _start(["--model", ckpt, "--data", data, "--steps", "50", *RUN, "--store", store])
    _wait_for_step(store, first, 1)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    step = manifest(store)["step"]
    assert main(["finetune", "--store", store, "--resume", "--steps", str(step + 1)]) == 0
    assert manifest(store)["step"] == step + 1


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_in_flight_with_its_exit_code(setup, tmp_path, sig, code):
    _tmp, ckpt, data = setup
    store = str(tmp_path / "s")
    proc = _start(["--model", ckpt, "--data", data, "--steps", "500", *RUN, "--store", store])
    _wait_for_step(store, proc, 1)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and f"fuyou finetune --store {store} --resume" in err
    assert 1 <= manifest(store)["step"] < 500


def _live_file(store, block, kind):
    m = manifest(store)
    v = next(b["versions"][kind] for b in m["blocks"] if b["name"] == block)
    return os.path.join(store, "blocks", f"{block}.{kind}.{v}.bin")


def test_no_verify_still_checks_what_the_optimizer_reads(setup, tmp_path, capsys):
    _tmp, ckpt, data = setup
    store = str(tmp_path / "s")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store, "--steps", "1", *RUN]) == 0
    path = _live_file(store, "layer0001", "master")
    raw = bytearray(open(path, "rb").read())
    raw[64] ^= 0x01
    open(path, "wb").write(raw)
    capsys.readouterr()
    assert main(["finetune", "--store", store, "--resume", "--steps", "2", "--no-verify"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the run summary: found by the first read
    assert line.startswith("fuyou: error: ") and "corrupted" in line and os.path.basename(path) in line
    assert manifest(store)["step"] == 1


def test_repeated_non_finite_steps_stop_the_run(setup, tmp_path, capsys):
    _tmp, ckpt, data = setup
    store = str(tmp_path / "s")
    assert main(["finetune", "--model", ckpt, "--data", data, "--store", store, "--steps", "1", *RUN]) == 0
    path = _live_file(store, "layer0000", "weights")
    raw = bytearray(open(path, "rb").read())
    raw[:4096] = b"\xff" * 4096  # NaN weights; --no-verify lets the weights' checksum go unchecked
    open(path, "wb").write(raw)
    capsys.readouterr()
    assert main(["finetune", "--store", store, "--resume", "--steps", "50", "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the skipped steps' warnings, then the reason it stopped
    assert err[-1].startswith("fuyou: error: 5 steps in a row had a non-finite gradient") and "still holds step 1" in err[-1], err
    assert manifest(store)["step"] == 1
