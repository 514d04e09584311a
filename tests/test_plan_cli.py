"""`fuyou plan` and `fuyou probe`: tables, saved rates, minimum budgets, one-line errors."""
import json

import pytest

from fuyou.cli import main


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUYOU_CONFIG_DIR", str(tmp_path / "cfg"))
    return tmp_path / "cfg"


def test_plan_70b_without_weights(capsys):
    code = main(["plan", "--model", "llama-70b", "--device", "cuda", "--gpu-mem", "70GiB", "--cpu-mem", "100GiB", "--max-prefetch-depth", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "llama-70b (70.554 B params" in out and "chosen plan" in out and "predicted step" in out
    assert "conservative defaults for cuda" in out and "sets by rule" in out
    assert "fuyou finetune --model llama-70b" in out


def test_plan_too_small_names_minimum(capsys):
    code = main(["plan", "--model", "llama-70b", "--device", "cuda", "--gpu-mem", "70GiB", "--cpu-mem", "2GiB", "--max-prefetch-depth", "0"])
    out = capsys.readouterr().out
    assert code == 1
    assert "no plan fits" in out and "--cpu-mem" in out


def test_plan_rates_from_flags_and_file(tmp_path, capsys):
    assert main(["plan", "--device", "cpu", "--ssd-bw", "3", "--compute-tflops", "0.1", "--max-prefetch-depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "storage read  │ 3.00 GB/s" in out and "storage write │ 3.00 GB/s" in out and "--ssd-bw" in out
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"read_Bps": 2e9, "write_Bps": 1e9, "h2d_Bps": 1e9, "d2h_Bps": 1e9, "compute_flops": 1e11, "optim_params_per_s": 1e9}))
    assert main(["plan", "--device", "cpu", "--rates", str(f), "--max-prefetch-depth", "1"]) == 0
    assert "2.00 GB/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["plan", "--model", "/nonexistent/model"], "neither a preset"),
        (["plan", "--device", "cpu", "--batch-size", "3", "--micro-batches", "2"], "not divisible"),
        (["plan", "--device", "cpu", "--max-prefetch-depth", "-1"], "max-prefetch-depth"),
        (["probe", "--store-dir", "/nonexistent/dir"], "not a directory"),
    ],
)
def test_bad_input_is_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_bad_rates_file(tmp_path, capsys):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"read_Bps": -1}))
    assert main(["plan", "--device", "cpu", "--rates", str(f)]) == 2
    assert "rates file" in capsys.readouterr().err


def _cpu():
    import torch

    from fuyou.planning.rates import machine_info

    return machine_info(torch.device("cpu"))["cpu"]


def test_probe_saves_rates_used_by_plan(tmp_path, config_dir, capsys):
    code = main(["probe", "--device", "cpu", "--store-dir", str(tmp_path), "--size", "2MiB", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--tokens", "256"])
    assert code == 0
    doc = json.loads((config_dir / "rates.json").read_text())
    assert doc["machine"]["device"] == "cpu" and doc["rates"]["read_Bps"] > 0 and doc["rates"]["compute_flops"] > 0
    assert set(doc["rates"]["optim_by_codec"]) == {"bf16/bf16+rem", "fp8/bf16+rem", "de8/bf16+rem", "log8/bf16+rem", "fp32/fp32/fp8"}
    assert doc["rates"]["copy_Bps"] > 0
    by_backend = doc["details"]["storage_by_backend"]
    assert "python" in by_backend and all(r["read_Bps"] > 0 and r["write_Bps"] > 0 for r in by_backend.values())
    assert [p.name for p in tmp_path.iterdir()] == ["cfg"]  # the probe's files are gone
    spread = doc["details"]["spread"]  # each rate's slow and fast quartile over the probe's runs
    for field in ("read_Bps", "write_Bps", "compute_flops", "optim_params_per_s"):
        slow, fast = spread[field]
        assert 0 < slow <= doc["rates"][field] <= fast, field
    capsys.readouterr()
    assert main(["plan", "--device", "cpu", "--max-prefetch-depth", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "probed" in out and "range (the probe's spread)" in out
    # A probe without --model did not time the planned model's blocks in steps: the plan says what to run.
    assert "did not time llama-tiny's blocks; `fuyou probe --model llama-tiny`" in out
    # The saved probe is this machine's only: on another, the plan says so and takes the defaults.
    doc["machine"]["cpu"] = "Some Other CPU"
    (config_dir / "rates.json").write_text(json.dumps(doc))
    assert main(["plan", "--device", "cpu", "--max-prefetch-depth", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "conservative defaults for cpu" in out and "another machine" in out and "range" not in out
    doc["machine"]["cpu"] = _cpu()  # this machine's again
    (config_dir / "rates.json").write_text(json.dumps(doc))
    # A compressed codec is planned with its own probed optimizer rate.
    from fuyou.config import StateConfig
    from fuyou.planning.settings import PlanConfig
    from fuyou.planning.search import make_plan
    from fuyou.planning.rates import load_rates

    rates, _src = load_rates("cpu")
    plan = make_plan(PlanConfig(model="llama-tiny", state=StateConfig(weights="bf16", master="bf16+rem", states="fp8"), max_prefetch_depth=0), rates)
    assert plan.rates.optim_params_per_s == doc["rates"]["optim_by_codec"]["fp8/bf16+rem"]


def test_auto_memory_config_is_what_the_runtime_builds():
    """The hook behind `fuyou finetune --plan auto`: its settings make the runtime's slot planner
    build the planned slots, within the budgets."""
    import torch

    from fuyou.config import BatchConfig, StateConfig
    from fuyou.planning.settings import PlanConfig
    from fuyou.step.memory_plan import plan_memory
    from fuyou.planning.search import auto_memory_config, load_model_config, model_shape

    cfg = PlanConfig(model="llama-tiny", batch=BatchConfig(batch_size=4, micro_batches=2, seq_len=32), device="cpu", cpu_mem_bytes=20 << 20, gpu_mem_bytes=64 << 20)
    mem, batch = auto_memory_config(cfg)
    assert mem.cpu_mem_bytes <= 20 << 20 and mem.gpu_mem_bytes <= 64 << 20 and batch.batch_size == 4
    hf = load_model_config("llama-tiny")
    shape = model_shape(hf, StateConfig())
    plan = plan_memory(shape.store, shape.cons, tied=shape.tied, device=torch.device("cpu"), compute_dtype=torch.float32, hidden_size=hf.hidden_size,
                       intermediate_size=hf.intermediate_size, vocab_size=hf.vocab_size, micro_batch_size=batch.micro_batch_size,
                       micro_batches=batch.micro_batches, seq_len=batch.seq_len, prefetch_depth=mem.prefetch_depth,
                       cpu_budget=mem.cpu_mem_bytes, device_budget=mem.gpu_mem_bytes)
    assert plan.weight_slots == mem.prefetch_depth + 1 and plan.cpu_bytes() <= mem.cpu_mem_bytes
    with pytest.raises(ValueError, match="--cpu-mem"):
        auto_memory_config(PlanConfig(model="llama-tiny", device="cpu", cpu_mem_bytes=1 << 20))


def test_plan_from_config_dir_without_weights(tmp_path, capsys):
    from tests.helpers import tiny_config

    tiny_config("qwen2").save_pretrained(str(tmp_path / "m"))
    assert main(["plan", "--model", str(tmp_path / "m"), "--device", "cpu", "--batch-size", "2", "--micro-batches", "1", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "chosen plan" in out and "predicted step" in out


def test_plan_explain_prints_the_chosen_plans_schedule(capsys):
    assert main(["plan", "--device", "cpu", "--max-prefetch-depth", "1", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit() and ":" in line]
    # One line per consumer of llama-tiny (4 layers): 5 forwards, the head, 5 backwards.
    assert [line.split()[1] for line in lines] == (["fwd:embed"] + [f"fwd:layer{i:04d}" for i in range(4)] + ["head:head"]
                                                 + [f"bwd:layer{i:04d}" for i in range(3, -1, -1)] + ["bwd:embed"])
    assert "commit" in out.splitlines()[-1]


def test_plan_warns_when_its_host_memory_exceeds_the_ram(capsys, monkeypatch):
    import psutil

    class Tiny:
        total = 1 << 20  # a 1 MiB machine: any plan's host memory exceeds it

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    assert main(["plan", "--device", "cpu", "--max-prefetch-depth", "0"]) == 0
    assert "exceeds this machine's RAM" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines


def test_plan_for_ranks_plans_one_ranks_share(capsys):
    """--ranks N: the busiest rank's rows, its blocks' optimizer state, the collectives between ranks."""
    from fuyou.config import BatchConfig
    from fuyou.planning.settings import PlanConfig
    from fuyou.planning.search import make_plan
    from scheduler.costmodel import Rates

    rates = Rates(read_Bps=2e9, write_Bps=1e9, h2d_Bps=1e10, d2h_Bps=1e10, compute_flops=1e11, optim_params_per_s=1e9, collective_Bps=1e9)
    cfg = PlanConfig(model="llama-1b", batch=BatchConfig(batch_size=8, micro_batches=4, seq_len=128), max_prefetch_depth=1, search_micro_batches=False)
    one, two = make_plan(cfg, rates), make_plan(PlanConfig(**{**cfg.__dict__, "ranks": 2}), rates)
    assert one.fits and two.fits
    ssd = [p.result.best.candidate.memory_bytes["ssd"] for p in (one, two)]
    assert ssd[1] < 0.75 * ssd[0]  # its store: every block's weights, half of the optimizer state
    events = two.result.best.prediction.trace.events
    assert any(e.lane == "comm" for e in events) and not any(e.lane == "comm" for e in one.result.best.prediction.trace.events)
    assert two.batch_config() == BatchConfig(batch_size=8, micro_batches=4, seq_len=128)  # the run's batch, every rank's rows
    assert main(["plan", "--model", "llama-1b", "--ranks", "2", "--collective-gbps", "5", "--max-prefetch-depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks (one rank's share: 4 rows" in out and "between ranks per step" in out and "5.00 GB/s per rank" in out
    assert "torchrun --nproc-per-node 2 -m fuyou finetune --store 'STORE{rank}'" in " ".join(out.split())
    assert main(["plan", "--ranks", "3"]) == 2  # the batch of 8 does not divide among 3 ranks
    assert "--ranks 3" in capsys.readouterr().err


def test_plan_for_lora_streams_a_frozen_base_with_the_adapters_on_the_device(capsys):
    """--peft lora: the base's weights alone in the store, read twice per step (forward, backward),
    nothing written, no optimizer; the adapters (sized by peft's rules) and their AdamW state on the device."""
    from fuyou.config import BatchConfig, PeftConfig, StateConfig
    from fuyou.planning.search import load_model_config, make_plan
    from fuyou.planning.settings import PlanConfig
    from fuyou.step.graph import bytes_per_step
    from scheduler.costmodel import Rates

    rates = Rates(read_Bps=2e9, write_Bps=1e9, h2d_Bps=1e10, d2h_Bps=1e10, compute_flops=1e11, optim_params_per_s=1e9)
    cfg = PlanConfig(model="llama-1b", batch=BatchConfig(batch_size=8, micro_batches=2, seq_len=128), state=StateConfig(weights="bf16"),
                     peft=PeftConfig(method="lora", r=16, target_modules="all-linear"), device="cuda", gpu_mem_bytes=6 << 30, max_prefetch_depth=1,
                     cache_mem_bytes=0)
    plan = make_plan(cfg, rates)
    assert plan.fits and plan.shape.frozen
    hf = load_model_config("llama-1b")
    h, i, kv = hf.hidden_size, hf.intermediate_size, hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads)
    per_layer = 16 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))  # q, k, v, o, gate, up, down: r x (in + out)
    assert plan.shape.adapter_numel == per_layer * hf.num_hidden_layers
    best = plan.result.best
    assert best.candidate.memory_bytes["gpu"] == best.candidate.extra["plan"].device_bytes() + 16 * plan.shape.adapter_numel
    assert best.candidate.memory_bytes["gpu"] <= 6 << 30
    moved = bytes_per_step(best.prediction.trace.events)
    weights = {b: lay.kinds["weights"].nbytes for b, lay in plan.shape.store.layouts.items()}
    assert moved["ssd written"] == 0 and moved["ssd read"] == 2 * sum(weights.values()) - weights["embed"] - weights["head"]
    assert not [e for e in best.prediction.trace.events if e.kind in ("optim", "write")]
    assert main(["plan", "--model", "llama-70b", "--peft", "lora", "--lora-r", "16", "--gpu-mem", "8GiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "LoRA r 16 on the frozen base" in out and "of it: adapters" in out and "fuyou finetune --peft lora --lora-r 16 --model llama-70b" in out
    assert main(["plan", "--peft", "lora", "--ranks", "2"]) == 2


def test_probe_of_a_models_layer_shape(tmp_path, config_dir, capsys):
    """--model: the probed decoder layer has that model's shape (the compute rate is its GEMMs')."""
    assert main(["probe", "--device", "cpu", "--store-dir", str(tmp_path), "--size", "2MiB", "--model", "llama-tiny", "--tokens", "128"]) == 0
    from fuyou.planning.search import load_model_config

    hf = load_model_config("llama-tiny")
    doc = json.loads((config_dir / "rates.json").read_text())
    shape = doc["details"]["compute"]["shape"]
    assert (shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"]) == (
        hf.hidden_size, hf.intermediate_size, hf.num_attention_heads, hf.num_key_value_heads)
    # Its steps timed the lanes too: the saved read rate is the in-step one, not the storage probe's alone.
    assert doc["details"]["calibrated_on"] == "llama-tiny" and doc["rates"]["latency_s"]["optim"] >= 0
    assert doc["rates"]["read_Bps"] != doc["details"]["storage"]["read_Bps"]
    capsys.readouterr()
    assert main(["plan", "--device", "cpu", "--model", "llama-tiny"]) == 0
    assert "did not time" not in " ".join(capsys.readouterr().out.split())
    assert main(["plan", "--device", "cpu", "--model", "llama-1b"]) == 0
    assert "did not time llama-1b's blocks (it timed llama-tiny's)" in " ".join(capsys.readouterr().out.split())


def test_the_documented_workstation_rates_plan_as_docs_planner_says(capsys):
    """docs/rates/fuyou-paper-testbed.json is a --rates file, and the plan docs/planner.md quotes is
    what `fuyou plan` makes of it."""
    import os

    rates = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "rates", "fuyou-paper-testbed.json")
    argv = ["plan", "--rates", rates, "--model", "llama-13b", "--device", "cuda", "--gpu-mem", "22GiB", "--cpu-mem", "700GiB", "--cache-mem", "0",
            "--batch-size", "64", "--seq-len", "1024", "--weights", "bf16"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "│ predicted step │ 71.849 s" in out and "│ bottleneck │ compute" in out


def test_plan_says_why_a_probe_could_not_time_the_models_blocks(tmp_path, config_dir, capsys, monkeypatch):
    """A model too large to cut and train for a moment: the probe says so, keeps its own rates, and
    the plan names why instead of the probe command that just could not do it."""
    import fuyou.cli.plan as plan_cli

    monkeypatch.setattr(plan_cli, "CALIBRATION_MAX_BYTES", 1 << 20)
    assert main(["probe", "--device", "cpu", "--store-dir", str(tmp_path), "--size", "2MiB", "--model", "llama-tiny", "--tokens", "128"]) == 0
    doc = json.loads((config_dir / "rates.json").read_text())
    assert "calibrated_on" not in doc["details"] and doc["details"]["not_calibrated"]["model"] == "llama-tiny"
    assert doc["rates"]["read_Bps"] == doc["details"]["storage"]["read_Bps"] and not doc["rates"]["compute_by_work"]
    capsys.readouterr()
    assert main(["plan", "--device", "cpu", "--model", "llama-tiny"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "could not time llama-tiny's blocks in steps (the model cut to 2 layers needs" in out and "fuyou probe --model" not in out
