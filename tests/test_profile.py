"""A trace of a real tiny run is valid Chrome JSON with one lane per resource; `fuyou profile`
reads it back, rebuilds the step's graph and draws the timeline."""
import json
import os

import pytest

from fuyou.cli import main
from fuyou.planning.profile import compute_stalls, graph_from_events, load_chrome_trace, profile_step, steps_of
from scheduler import Trace
from scheduler.trace import TraceEvent
from tests.helpers import random_batches, save_checkpoint, tiny_config
from tests.helpers import run_fuyou

LANES = {"read", "compute", "optim", "write"}  # CPU device, fp32 weights: no h2d lane


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("prof")
    cfg = tiny_config("llama", tie_word_embeddings=True)
    ckpt = save_checkpoint(str(root / "ckpt"), cfg, tokenizer=False)
    trace = Trace()
    from fuyou.config import MemoryConfig

    rt, results = run_fuyou(ckpt, str(root / "store"), random_batches(3, 4, 16, cfg.vocab_size), 2, MemoryConfig(prefetch_depth=1), trace=trace)
    path = str(root / "trace.json")
    trace.save_chrome(path)
    return path, rt, results


def test_trace_is_chrome_json_one_lane_per_resource(traced):
    path, rt, results = traced
    with open(path) as f:
        doc = json.load(f)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e.get("ph") == "M" and e["name"] == "thread_name"}
    assert names == LANES
    tasks = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and "bytes" in e["args"] and "step" in e["args"] for e in tasks)
    tids = {e["tid"] for e in tasks}
    assert len(tids) == len(LANES)
    events = load_chrome_trace(path)
    assert sorted(steps_of(events)) == [r.step for r in results]


def test_graph_rebuilt_from_trace_matches_runtime(traced):
    path, rt, _results = traced
    events = steps_of(load_chrome_trace(path))[2]
    graph, slots = graph_from_events(events)
    assert slots["opt_slots"] <= rt.plan.opt_slots and slots["weight_slots"] <= rt.plan.weight_slots
    assert slots["device_slots"] == rt.plan.device_slots == 0
    assert {t.name for t in graph.tasks} == {e.name for e in events}
    sizes = {e.name: (e.nbytes, e.flops) for e in events}
    assert all(sizes[t.name] == (t.nbytes, t.flops) for t in graph.tasks)


def test_profile_cli_writes_png_and_table(traced, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FUYOU_CONFIG_DIR", str(tmp_path / "cfg"))
    path, _rt, _results = traced
    png = str(tmp_path / "t.png")
    assert main(["profile", "--trace", path, "--png", png, "--compute-tflops", "0.05"]) == 0
    out = capsys.readouterr().out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for row in ("busy compute", "overlap", "compute stall: weights read", "compute stall: optimizer slot", "moved ssd read", "predicted (fitted from this trace)", "achieved step time"):
        assert row in out


def test_profile_summary_on_synthetic_step():
    """Hand-made events: busy %, overlap and stall causes come out as computed by hand."""
    ms = 1_000_000
    ev = [
        TraceEvent("read_w0:embed", "read", "read", 0, 10 * ms, nbytes=100, step=1, meta={"block": "embed"}),
        TraceEvent("fwd:embed", "compute", "compute", 10 * ms, 20 * ms, step=1, meta={"block": "embed", "phase": "fwd"}),
        TraceEvent("read_w1:head", "read", "read", 10 * ms, 30 * ms, nbytes=100, step=1, meta={"block": "head"}),
        TraceEvent("head:head", "compute", "compute", 30 * ms, 40 * ms, flops=10, step=1, meta={"block": "head", "phase": "head"}),
    ]
    prof = profile_step(ev)
    assert prof.step_s == pytest.approx(0.040)
    assert prof.busy == pytest.approx({"read": 0.75, "compute": 0.5})
    assert prof.overlap == pytest.approx(0.5)  # fwd:embed ran during read_w1
    stalls = compute_stalls(ev)
    assert stalls["weights read"] == pytest.approx(0.020) and stalls["scheduling"] == pytest.approx(0.0)
    assert prof.bytes["ssd read"] == 200


@pytest.mark.parametrize("content,match", [("{", "cannot read trace"), ('{"a": 1}', "not a Chrome trace"), ('{"traceEvents": []}', "no task events")])
def test_profile_bad_trace_is_one_line(tmp_path, capsys, content, match):
    p = tmp_path / "trace.json"
    p.write_text(content)
    assert main(["profile", "--trace", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_profile_missing_step(traced, capsys):
    path, _rt, _r = traced
    assert main(["profile", "--trace", path, "--step", "99", "--png", os.devnull]) == 2
    assert "step 99 is not in the trace" in capsys.readouterr().err
