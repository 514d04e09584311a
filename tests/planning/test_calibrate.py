"""Compute measured on a model's own blocks (planning/calibrate.py): a line per kind of work through
the medians of the sizes, and a calibration the cost model then times compute tasks with."""
import pytest
import torch

from fuyou.planning.calibrate import _line, calibrate_compute
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
    work = calibrate_compute(hf, device=torch.device("cpu"), seq_len=16, rows=(1, 2), store_dir=str(tmp_path))
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
