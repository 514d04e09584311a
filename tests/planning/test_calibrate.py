"""Compute and the other lanes measured on a model's own blocks (planning/calibrate.py): a line per
kind of work through the medians of the sizes, the read, write and optimizer tasks as the runtime
ran them, and a calibration the cost model then times tasks with."""
import pytest
import torch

from fuyou.planning.calibrate import Calibration, _line, calibrate, in_step_rates
from fuyou.planning.search import model_shape, planned_graph, run_memory_plan, run_step_spec
from fuyou.planning.settings import PlanConfig
from fuyou.config import BatchConfig, MemoryConfig, StateConfig
from fuyou.step.graph import LANES
from scheduler.costmodel import Rates, predict
from tests.helpers import tiny_config


def test_the_line_through_the_sizes():
    # 2 ms per call + 1 GFLOP per 10 ms, with noise on the repeats of each size (the median is taken).
    pts = [(f, 0.002 + f / 1e11 + noise) for f in (1e8, 2e8, 4e8) for noise in (0.0, 0.0, 0.05)]
    rate, per_call = _line(pts)
    assert rate == pytest.approx(1e11) and per_call == pytest.approx(0.002)
    assert _line([(0.0, 0.003), (0.0, 0.004), (0.0, 0.005)]) == (1.0, 0.004)  # no FLOPs: all cost per call
    assert _line([(1e8, 0.01)]) == (pytest.approx(1e10), 0.0)  # one size: all rate
    assert _line([(1e8, 0.02), (2e8, 0.01)]) == (pytest.approx(2e10), 0.0)  # the larger not slower (noise): all rate


def test_calibration_measures_every_kind_of_work_and_the_plan_uses_it(tmp_path):
    hf = tiny_config("llama", num_hidden_layers=3)
    work = calibrate(hf, device=torch.device("cpu"), seq_len=16, rows=(1, 2), store_dir=str(tmp_path)).compute_by_work
    assert set(work) == {"embed:fwd", "embed:bwd", "head", "layer:fwd:keep", "layer:bwd:keep", "layer:fwd:recompute", "layer:bwd:recompute"}
    assert all(rate > 0 and per_call >= 0 for rate, per_call in work.values())
    assert list(tmp_path.iterdir()) == []  # its scratch store is gone
    cfg = PlanConfig(batch=BatchConfig(batch_size=4, micro_batches=2, seq_len=16), state=StateConfig(), device="cpu")
    shape = model_shape(hf, cfg.state)
    plan = run_memory_plan(shape, cfg, cfg.batch, MemoryConfig(cache_mem_bytes=0))
    graph = planned_graph(shape, run_step_spec(shape, cfg, cfg.batch, plan), cfg.batch.micro_batches)
    base = Rates(read_Bps=1e12, write_Bps=1e12, h2d_Bps=1e12, d2h_Bps=1e12, compute_flops=1e15, optim_params_per_s=1e15)
    calibrated = base.replace(compute_by_work=work)
    kinds = {t.meta["work"] for t in graph.tasks if t.kind == "compute"}
    assert kinds <= set(work)
    want = sum(t.meta["calls"] * work[t.meta["work"]][1] + t.flops / work[t.meta["work"]][0] for t in graph.tasks if t.kind == "compute")
    assert predict(graph, calibrated, LANES).busy_s["compute"] == pytest.approx(want)
    assert predict(graph, calibrated, LANES).step_s > predict(graph, base, LANES).step_s


def test_in_step_rates_are_the_lines_through_the_runtimes_tasks():
    """Read and write: cost + bytes / rate fitted to the tasks; the optimizer: every probed rate
    (each codec's too) scaled by the factor its tasks ran at, plus their cost; the spread moves
    with each rate it changes, by the same ratio."""
    base = Rates(read_Bps=2e9, write_Bps=3e9, h2d_Bps=1e10, d2h_Bps=1e10, compute_flops=1e11, optim_params_per_s=1e9,
                 optim_by_codec={"fp8/bf16+rem": 2e8}, latency_s={"commit": 0.001})
    sizes = [1e6, 4e6, 9e6, 1.2e7]
    cal = Calibration(
        compute_by_work={"head": (5e10, 0.002)},
        lane_points={"read": [(b, 0.001 + b / 1e9) for b in sizes], "write": [(b, 0.005 + b / 1.5e9) for b in sizes],
                     "optim": [(n, 0.0005 + 4 * n / 1e9) for n in sizes]})  # 4x slower than probed, +0.5 ms a task
    spread = {"read_Bps": [1.8e9, 2.2e9], "compute_flops": [9e10, 1.1e11], "optim_by_codec": {"fp8/bf16+rem": [1.5e8, 2.5e8]}}
    rates, moved = in_step_rates(base, spread, cal)
    assert rates.read_Bps == pytest.approx(1e9) and rates.latency_s["read"] == pytest.approx(0.001)
    assert rates.write_Bps == pytest.approx(1.5e9) and rates.latency_s["write"] == pytest.approx(0.005)
    assert rates.optim_params_per_s == pytest.approx(2.5e8) and rates.latency_s["optim"] == pytest.approx(0.0005)
    assert rates.optim_by_codec["fp8/bf16+rem"] == pytest.approx(5e7)
    assert rates.compute_by_work == {"head": (5e10, 0.002)} and rates.latency_s["commit"] == 0.001
    assert moved["read_Bps"] == pytest.approx([0.9e9, 1.1e9]) and moved["compute_flops"] == [9e10, 1.1e11]
    assert moved["optim_by_codec"]["fp8/bf16+rem"] == pytest.approx([3.75e7, 6.25e7])
    assert spread["read_Bps"] == [1.8e9, 2.2e9]  # the probe's own spread is left as it was
    # No tasks of a lane (a calibration without optimizer steps): its probed rates stand.
    alone, _ = in_step_rates(base, None, Calibration({"head": (5e10, 0.002)}))
    assert (alone.read_Bps, alone.write_Bps, alone.optim_params_per_s) == (2e9, 3e9, 1e9)


def test_calibration_times_the_runtimes_own_lanes(tmp_path):
    hf = tiny_config("llama", num_hidden_layers=2)
    cal = calibrate(hf, device=torch.device("cpu"), seq_len=16, rows=(1,), store_dir=str(tmp_path))
    # Two blocks' weights and states read, each block's states written and updated, in every step after the first.
    assert {k: len(v) >= 8 for k, v in cal.lane_points.items()} == {"read": True, "write": True, "optim": True}
    assert all(size > 0 and seconds > 0 for pts in cal.lane_points.values() for size, seconds in pts)
    params = {n for n, _ in cal.lane_points["optim"]}
    assert len(params) >= 2  # the embedding's, a layer's, the head's: the model's own sizes
