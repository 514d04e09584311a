"""Data parallel over torch.distributed (gloo, two CPU processes launched by torchrun): two ranks train
like one process on the same global batch, with clipping active; each rank's store holds its share
of the optimizer state; a rank killed at any point and both restarted with --resume end bit-identical
to an uninterrupted two-rank run; what cannot work is refused in one line."""
import glob
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fuyou.cli import main
from tests.helpers import save_checkpoint, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 5
OPTIM_KINDS = ("master", "exp_avg", "exp_avg_sq")


def torchrun(n: int, args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "fuyou", "finetune", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def committed_step(store):
    path = os.path.join(store, "manifest.json")
    return json.load(open(path))["step"] if os.path.exists(path) else None


def metrics(store):
    return [json.loads(line) for line in open(os.path.join(store, "metrics.jsonl"))]


def blocks_content(store):
    d = os.path.join(store, "blocks")
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def exported(path):
    from safetensors.torch import load_file

    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint and its data; the run on one process and on two ranks (global batch 8 in 4
    micro-batches: 2 per rank, so the ranks sum the gradient in another order than one process)."""
    tmp = tmp_path_factory.mktemp("dp")
    ckpt = save_checkpoint(str(tmp / "ckpt"), tiny_config("llama", vocab_size=640))
    data = tmp / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Row {i}: the ranks share every batch, {i * 7} apples and {i} pears."}) for i in range(120)))
    args = ["--model", ckpt, "--data", str(data), "--batch-size", "8", "--micro-batches", "4", "--seq-len", "16", "--lr", "1e-3",
            "--device", "cpu", "--max-grad-norm", "0.5", "--eval-split", "0.1", "--eval-every", "2", "--cache-mem", "0"]
    single = str(tmp / "single")
    assert main(["finetune", *args, "--store", single, "--steps", str(STEPS)]) == 0
    ranks = str(tmp / "rank{rank}")
    proc = torchrun(2, [*args, "--store", ranks, "--steps", str(STEPS), "--trace", str(tmp / "trace")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, args=args, single=single, ranks=ranks, stores=[ranks.format(rank=r) for r in range(2)], log=proc.stderr)


def test_two_ranks_train_like_one_process(run):
    one, two = metrics(run.single), metrics(run.stores[0])
    steps = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert [r["status"] for r in steps[0]] == [r["status"] for r in steps[1]]
    assert {r["status"] for r in steps[0]} == {"clipped"}  # clipping active every step: the redo runs across ranks
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in steps[1]], dtype=torch.float64),
                                   torch.tensor([r[key] for r in steps[0]], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert [r["tokens"] for r in steps[1]] == [r["tokens"] for r in steps[0]]  # the global batch's tokens
    # Every block's gradient (4 B/param) reduced and its weights (fp32: 4 B/param) broadcast, twice for
    # the weights when the step is clipped (the redo sends them again).
    numel = json.load(open(os.path.join(run.single, "manifest.json")))["model"]["numel"]
    assert all(r["bytes_between_ranks"] == 0 for r in steps[0])
    assert all(12 * numel <= r["bytes_between_ranks"] <= 12 * numel * 1.01 for r in steps[1]), (numel, steps[1][0]["bytes_between_ranks"])
    evals = [r for r in one if "eval_loss" in r], [r for r in two if "eval_loss" in r]
    assert [r["step"] for r in evals[1]] == [r["step"] for r in evals[0]] == [2, 4, 5]
    torch.testing.assert_close(torch.tensor([r["eval_loss"] for r in evals[1]]), torch.tensor([r["eval_loss"] for r in evals[0]]), rtol=1e-5, atol=1e-6)
    assert [r["eval_tokens"] for r in evals[1]] == [r["eval_tokens"] for r in evals[0]]
    # The final master weights: every rank's blocks gathered by the export, against one process's.
    assert main(["export", "--store", run.single, "--to", str(run.tmp / "out1")]) == 0
    assert main(["export", "--store", run.ranks, "--to", str(run.tmp / "out2")]) == 0
    a, b = exported(str(run.tmp / "out1")), exported(str(run.tmp / "out2"))
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # summed in another order: equal to rounding, not bit for bit


def _state_bytes(store, kinds):
    return sum(os.path.getsize(f) for k in kinds for f in glob.glob(os.path.join(store, "blocks", f"*.{k}.*.bin")))


def test_each_rank_holds_its_share_of_the_optimizer_state(run):
    whole = _state_bytes(run.single, OPTIM_KINDS)
    shares = [_state_bytes(s, OPTIM_KINDS) for s in run.stores]
    assert sum(shares) == whole  # every block's state on exactly one rank
    assert all(0.35 * whole <= s <= 0.65 * whole for s in shares), (shares, whole)
    for s in run.stores:  # every rank streams every block's compute weights from its own store
        assert _state_bytes(s, ("weights",)) == _state_bytes(run.single, ("weights",))
    owners = json.load(open(os.path.join(run.stores[0], "manifest.json")))["train"]["run"]["ranks"]
    assert owners["world_size"] == 2 and sorted(set(owners["owners"].values())) == [0, 1]


# (point, n, rank): that rank is SIGKILLed the n-th time it reaches the point. Every step is clipped
# here, so each runs the optimizer body 10 times (5 blocks, then the redo): "optim:7" dies in step 1's
# redo, "optim:13" in step 2's backward; "prepared:3": rank 1 made step 3 durable, no rank may commit
# it yet (both roll back); "commit:3": rank 0 dies before switching to step 2's manifest (the import's
# was its first) while rank 1 commits it (rank 0 rolls forward); "committed:3": rank 0 switched to
# step 2's manifest and dies before forgetting its prepared copy.
CRASHES = [("optim", 7, 1), ("optim", 13, 1), ("prepared", 3, 1), ("commit", 3, 0), ("committed", 3, 0)]


@pytest.mark.parametrize("point,n,rank", CRASHES)
def test_a_rank_killed_mid_step_then_both_resumed_is_bit_identical(run, point, n, rank):
    stores = str(run.tmp / f"{point}{n}-{{rank}}")
    crashed = torchrun(2, [*run.args, "--store", stores, "--steps", str(STEPS)], {"FUYOU_CRASH_AT": f"{point}:{n}", "FUYOU_CRASH_RANK": str(rank)})
    assert crashed.returncode != 0, "the crash point was never reached"
    assert f"Signal {int(signal.SIGKILL)} (SIGKILL) received by PID" in crashed.stderr, crashed.stderr[-3000:]
    paths = [stores.format(rank=r) for r in range(2)]
    assert all(committed_step(p) is not None and committed_step(p) < STEPS for p in paths)
    resumed = torchrun(2, ["--store", stores, "--resume", "--steps", str(STEPS)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for mine, ref in zip(paths, run.stores):
        assert committed_step(mine) == STEPS
        assert blocks_content(mine) == blocks_content(ref)
        m, r = (json.load(open(os.path.join(p, "manifest.json"))) for p in (mine, ref))
        assert m["blocks"] == r["blocks"] and m["train"]["data_position"] == r["train"]["data_position"]
        assert not os.path.exists(os.path.join(mine, "manifest.prepared.json"))


def test_what_ranks_cannot_do_is_refused_in_one_line(run, capsys):
    proc = torchrun(2, [*run.args, "--store", str(run.tmp / "shared"), "--steps", "1"])
    assert proc.returncode != 0
    assert "fuyou: error: 2 ranks need a store each: put {rank} in --store" in proc.stderr
    assert not os.path.exists(run.tmp / "shared")
    # A two-rank run's store on one process, or on another number of ranks: refused, nothing touched.
    before = blocks_content(run.stores[0])
    assert main(["finetune", "--store", run.stores[0], "--resume", "--steps", str(STEPS + 1)]) == 2
    assert "was trained by 2 ranks" in capsys.readouterr().err
    one = torchrun(1, ["--store", run.stores[0], "--resume", "--steps", str(STEPS + 1)])
    assert one.returncode != 0 and "was trained by 2 ranks" in one.stderr
    assert blocks_content(run.stores[0]) == before and committed_step(run.stores[0]) == STEPS


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The bad token sits in rank 1's rows of the second batch only: rank 0's own gradient is finite,
    but the global norm is not, so both ranks skip the step and leave their stores as they were."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import random_batches

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    bad = 5
    with torch.no_grad():
        model.model.embed_tokens.weight[bad] = float("inf")
    model.save_pretrained(str(tmp_path / "ckpt"))
    batches = random_batches(3, 4, 16, 128, seed=5)
    for b in batches:
        b.input_ids[b.input_ids == bad] = bad + 1
    batches[1].input_ids[3, 4] = bad  # row 3 of 4: rank 1's
    (tmp_path / "b.json").write_text(json.dumps([b.input_ids.tolist() for b in batches]))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "tests", "dist", "skip_script.py"),
                           str(tmp_path / "ckpt"), str(tmp_path / "s{rank}"), str(tmp_path / "b.json")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for rank in (0, 1):
        mine = [r for r in rows if r["rank"] == rank]
        assert [(r["status"], r["step"]) for r in mine] == [("ok", 1), ("skipped", 1), ("ok", 2)]
        assert mine[1]["files"] == mine[0]["files"]  # the skipped step left nothing behind
        assert json.load(open(tmp_path / f"s{rank}" / "manifest.json"))["step"] == 2


def test_rank_zero_reports_and_the_profiler_reads_a_ranks_trace(run, capsys):
    assert run.log.count("ranks: 2 (this is rank 0") == 1 and "this is rank 1" not in run.log  # rank 0 speaks for the run
    assert run.log.count("done: 5 steps") == 1
    for rank in (0, 1):
        assert main(["profile", "--trace", str(run.tmp / "trace" / f"rank{rank}" / "trace.json"), "--png", str(run.tmp / f"t{rank}.png")]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "busy comm" in out and "moved between ranks" in out
        assert "predicted (fitted from this trace)" in out  # the rank's step graph, collectives included, rebuilt from its trace
