"""The benchmark scripts' dry runs and table helpers (benchmarks themselves never run as tests)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple
from types import SimpleNamespace

import pytest

from benchmarks import _common, bench_scale, bench_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ("env", "deps", "build", "tests", "finetune", "profile", "gemm", "io", "e2e")  # the default ones


def _path_without_nvidia_smi() -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not os.path.exists(os.path.join(d, "nvidia-smi")))


@pytest.mark.parametrize("args", [["--dry-run"], []], ids=["flag", "no-gpu"])
def test_gpu_check_dry_run_names_every_stage(args):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    env = dict(os.environ, PATH=_path_without_nvidia_smi())
    proc = subprocess.run(["bash", GPU_CHECK, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for stage in STAGES:
        assert f"  {stage}:" in proc.stdout, f"stage {stage} missing from:\n{proc.stdout}"
    assert "dry run" in proc.stdout
    assert "--gpu-mem 3GiB" in proc.stdout  # the e2e run offloads: budget below llama-1b's 4.4 GB of fp32 weights
    assert "  suite:" not in proc.stdout  # the whole suite only when asked for


def test_gpu_check_stage_selection():
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    env = dict(os.environ, PATH=_path_without_nvidia_smi(), GPU_CHECK_STAGES="build suite")
    proc = subprocess.run(["bash", GPU_CHECK, "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = [ln.split(":")[0].strip() for ln in proc.stdout.splitlines() if ln.startswith("  ")]
    assert listed == ["build", "suite"]


def test_bench_scale_dry_run_prints_plan(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_scale.py"), "--dry-run", "--model", "llama-tiny", "--store", str(tmp_path / "s")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "training state 16 B/param" in proc.stdout
    assert "dry run: disk check passed" in proc.stdout
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_bench_scale_refuses_small_disk(tmp_path, monkeypatch, capsys):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(bench_scale.shutil, "disk_usage", lambda _p: Usage(10 << 30, 9 << 30, 1 << 30))
    rc = bench_scale.main(["--dry-run", "--model", "llama-220m", "--store", str(tmp_path / "s")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not enough free disk" in err and "--store" in err


@pytest.mark.parametrize("mode,factor", [("safe", 2.0), ("lean", 1.25)])
@pytest.mark.parametrize("plain", [False, True])
def test_disk_need_follows_the_disk_mode(tmp_path, mode, factor, plain):
    """Peak disk: 2x the state in safe mode, 1.25x in lean; plus the start checkpoint only when one
    is written (plain PyTorch needs it; a preset alone is imported directly)."""
    argv = ["--model", "llama-tiny", "--store", str(tmp_path / "s"), "--disk-mode", mode] + (["--plain"] if plain else [])
    p = bench_scale.plan(bench_scale.parse_args(argv))
    assert p["state_bytes"] == 16 * p["numel"]
    ckpt = bench_scale.CKPT_BYTES_PER_PARAM * p["numel"] if plain else 0
    assert p["need_disk_bytes"] == int(p["state_bytes"] * (factor + bench_scale.DISK_MARGIN)) + ckpt


def test_overlap_pct():
    Ev = SimpleNamespace
    ev = [Ev(lane="compute", duration_s=1.0), Ev(lane="read", duration_s=0.6), Ev(lane="write", duration_s=0.4)]
    assert bench_scale.overlap_pct(ev, 1.0) == pytest.approx(100.0)  # all I/O hidden
    assert bench_scale.overlap_pct(ev, 2.0) == pytest.approx(0.0)  # nothing hidden
    assert bench_scale.overlap_pct(ev, 1.5) == pytest.approx(50.0)
    assert bench_scale.overlap_pct([], 1.0) == pytest.approx(100.0)


def test_common_helpers():
    assert _common.median([3, 1, 2]) == 2
    assert _common.median([4, 1, 2, 3]) == 2.5
    with pytest.raises(ValueError):
        _common.median([])
    assert _common.ratio(3.0, 2.0) == "1.50x"
    assert _common.ratio(None, 2.0) == "n/a"
    assert _common.fmt_bytes(3 << 30) == "3.00 GiB"
    t = _common.markdown_table(["a", "b"], [[1, "x|y"]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]
    io = _common.io_bytes()
    assert set(io) == {"read_bytes", "write_bytes"} and all(v >= 0 for v in io.values())
    assert _common.peak_rss_bytes() > 0
    assert "cores" in _common.machine_info()


def _steps(losses, secs, io=(0, 0)):
    return [{"loss": l, "seconds": s, "io_read_bytes": io[0], "io_write_bytes": io[1], "rss_peak_bytes": 1 << 30} for l, s in zip(losses, secs)]


def test_bench_step_render_reports_failure_and_ratio():
    a = bench_step.parse_args(["--steps", "3"])
    fu = _steps([2.0, 1.9, 1.8], [9.0, 3.0, 3.3], io=(20 * 100, 16 * 100))
    for s in fu:
        s.update(store_read_bytes=2000, store_written_bytes=1600, host_copied_bytes=300, lanes={"compute": 2.0, "read": 1.0}, kinds={"compute": 2.0})
    results = {
        "plain": {"numel": 100, "steps": _steps([2.0, 1.9, 1.8], [5.0, 2.0, 2.2])},
        "deepspeed": {"error": "exit 1: RuntimeError: boom"},
        "fuyou": {"numel": 100, "steps": fu},
    }
    text = bench_step.render(a, {"cpu": "x", "date": "d"}, results)
    assert "failed: exit 1: RuntimeError: boom" in text
    assert "| fuyou (store) | 3.15 | 1.50x | 20.0 / 16.0 (36.0) | 20.0 / 16.0 (copied 3.0) |" in text  # medians of steps 2..3
    assert "NOT met" in text and "| compute | 2.00 |" in text


def test_bench_store_runs_every_method(tmp_path, capsys):
    from benchmarks import bench_store

    out = tmp_path / "store.md"
    assert bench_store.main(["--mib", "1", "--rounds", "3", "--dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    for method in ("raw (no checksum)", "checksum then write", "checksum during the write", "read then checksum", "checksum per piece during the read"):
        assert f"| {method} |" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fuyou-bench-store-")]  # its files are removed


def test_bench_predict_configurations_cover_the_matrix():
    """bench_predict's matrix differs where the cost model could be wrong: model sizes, fp32 and fp8
    states, fp8 weights, cache on and off, recompute always and auto, offloaded block inputs, 1, 2
    and 4 micro-batches, lean disk mode, clipping."""
    from benchmarks.bench_predict import CONFIGS, MODELS

    assert len(CONFIGS) >= 8 and {c.model for c in CONFIGS} == set(MODELS)
    assert {c.state.states for c in CONFIGS} >= {"fp32", "fp8"} and "fp8" in {c.state.weights for c in CONFIGS}
    memories = [c.memory for c in CONFIGS]
    assert "offload" in memories and any(getattr(m, "cache_mem_bytes", 0) is None for m in memories)
    assert {getattr(m, "recompute", "always") for m in memories} >= {"always", "auto"}
    assert {c.batch.micro_batches for c in CONFIGS} >= {1, 2, 4} and "lean" in {c.disk_mode for c in CONFIGS}
    assert any(c.clip is not None for c in CONFIGS)
