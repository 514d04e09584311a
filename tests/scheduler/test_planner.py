"""Planner: synthetic candidates (pure scheduler) and property tests over random model configs."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import Graph
from scheduler.costmodel import Rates
from scheduler.planner import Candidate, choose, fits, minimum_budgets

ONE = dict(read_Bps=1.0, write_Bps=1.0, h2d_Bps=1.0, d2h_Bps=1.0, compute_flops=1.0, optim_params_per_s=1.0)


def _chain(*flops):
    def build():
        g = Graph()
        prev = None
        for i, f in enumerate(flops):
            prev = g.add(f"c{i}", "compute", "compute", lambda: None, [prev], flops=f)
        return g

    return build


def test_choose_fastest_fitting_and_naive():
    naive = Candidate({"k": "naive"}, {"cpu": 1}, _chain(10))
    fast_big = Candidate({"k": "fast"}, {"cpu": 100}, _chain(2))
    mid = Candidate({"k": "mid"}, {"cpu": 5}, _chain(5))
    res = choose([fast_big, mid], {"cpu": 10}, Rates(**ONE), naive=naive)
    assert res.best.candidate is mid and res.naive.candidate is naive
    assert [e.candidate.knobs["k"] for e in res.fitting] == ["mid", "naive"]
    res = choose([fast_big, mid], {"cpu": None}, Rates(**ONE), naive=naive)
    assert res.best.candidate is fast_big


def test_ties_prefer_preference_then_memory_never_slower_than_naive():
    naive = Candidate({"k": "naive"}, {"cpu": 1}, _chain(1000), preference=(1,))
    near = Candidate({"k": "near"}, {"cpu": 50}, _chain(1001), preference=(0,))
    assert choose([near], {"cpu": None}, Rates(**ONE), naive=naive).best.candidate is naive
    twin = Candidate({"k": "twin"}, {"cpu": 50}, _chain(1000), preference=(0,))
    assert choose([twin], {"cpu": None}, Rates(**ONE), naive=naive).best.candidate is twin


def test_nothing_fits_reports_minimum():
    a = Candidate({"k": "a"}, {"cpu": 10, "gpu": 30}, _chain(1))
    b = Candidate({"k": "b"}, {"cpu": 20, "gpu": 20}, _chain(1))
    res = choose([a, b], {"cpu": 5, "gpu": 5}, Rates(**ONE))
    assert res.best is None and res.fitting == []
    assert fits(res.minimum_candidate.memory_bytes, res.minimum_budgets)
    c = Candidate({"k": "c"}, {"cpu": 10, "gpu": 20}, _chain(1))
    need, cand = minimum_budgets([a, b, c], {"cpu": 5, "gpu": 5})
    assert need == {"cpu": 10, "gpu": 20} and cand is c


# -- fuyou.planning.search over random model configs ------------------------------------------------------
from fuyou.config import BatchConfig, MemoryConfig, StateConfig  # noqa: E402
from fuyou.planning.settings import PlanConfig  # noqa: E402
from fuyou.step.memory_plan import plan_for_model  # noqa: E402
from fuyou.planning.search import make_plan, model_shape  # noqa: E402

RATES = Rates(read_Bps=1e9, write_Bps=0.8e9, h2d_Bps=5e9, d2h_Bps=5e9, compute_flops=5e10, optim_params_per_s=3e8,
              latency_s={"read": 2e-3, "write": 1e-2}, compute_call_s=1e-3)


@st.composite
def configs(draw):
    from transformers import LlamaConfig

    heads = draw(st.sampled_from([1, 2, 4]))
    hidden = heads * draw(st.integers(2, 12)) * 2
    hf = LlamaConfig(
        hidden_size=hidden, intermediate_size=draw(st.integers(1, 97)), num_hidden_layers=draw(st.integers(1, 4)),
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=draw(st.integers(5, 301)),
        tie_word_embeddings=draw(st.booleans()), max_position_embeddings=128,
    )
    batch = draw(st.integers(1, 6))
    micro = draw(st.sampled_from([d for d in range(1, batch + 1) if batch % d == 0]))
    b = BatchConfig(batch_size=batch, micro_batches=micro, seq_len=draw(st.integers(2, 33)))
    state = StateConfig(weights=draw(st.sampled_from(["fp32", "bf16"])))
    device = draw(st.sampled_from(["cpu", "cuda"]))
    scale = {t: draw(st.floats(0.3, 4.0)) for t in ("cpu", "gpu", "ssd")}
    return hf, b, state, device, scale


_SHAPES = {}


def _shape(hf, state):
    key = (hf.to_json_string(), state)
    if key not in _SHAPES:
        _SHAPES[key] = model_shape(hf, state)
    return _SHAPES[key]


def _plan(hf, b, state, device, budgets, recompute="auto"):
    cfg = PlanConfig(batch=b, state=state, device=device, max_prefetch_depth=2, memory=MemoryConfig(recompute=recompute), **budgets)
    return make_plan(cfg, RATES, shape=_shape(hf, state))


def _budgets(hf, b, state, device, scale):
    """Budgets scattered around what the naive plan needs, so some fit and some do not."""
    free = _plan(hf, b, state, device, {})
    need = free.result.naive.candidate.memory_bytes
    return {"cpu_mem_bytes": int(need["cpu"] * scale["cpu"]), "gpu_mem_bytes": int(need["gpu"] * scale["gpu"]), "ssd_bytes": int(need["ssd"] * scale["ssd"])}


def _runtime_plan(plan):
    """What the runtime's own slot planner makes of the chosen run settings (the call finetune makes)."""
    shape, cfg = plan.shape, plan.cfg
    mem, batch = plan.memory_config(), plan.batch_config()
    dev = torch.device(cfg.device)
    compute = torch.float32 if cfg.device == "cpu" else {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.state.weights]
    return plan_for_model(shape.store, shape.skeleton, device=dev, batch=batch, memory=mem, compute_dtype=compute)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(configs())
def test_plan_respects_budgets_and_beats_naive(case):
    hf, b, state, device, scale = case
    budgets = _budgets(hf, b, state, device, scale)
    plan = _plan(hf, b, state, device, budgets)
    res = plan.result
    if res.best is None:
        assert res.minimum_budgets is not None and res.fitting == []  # see test_impossible_budgets_...
        return
    mem = res.best.candidate.memory_bytes
    assert mem["cpu"] <= budgets["cpu_mem_bytes"] and mem["gpu"] <= budgets["gpu_mem_bytes"] and mem["ssd"] <= budgets["ssd_bytes"]
    # The runtime, handed the plan's settings, builds exactly the planned slots within the budgets.
    rt = _runtime_plan(plan)
    k = res.best.candidate.knobs
    assert (rt.weight_slots, rt.device_slots, rt.opt_slots) == (k["weight_slots"], k["device_slots"], k["opt_slots"])
    assert rt.cpu_bytes() <= budgets["cpu_mem_bytes"] and rt.device_bytes() <= budgets["gpu_mem_bytes"]
    naive_fits = all(res.naive.candidate.memory_bytes[t] <= budgets[f] for t, f in (("cpu", "cpu_mem_bytes"), ("gpu", "gpu_mem_bytes"), ("ssd", "ssd_bytes")))
    if naive_fits:
        assert res.best.step_s <= res.naive.step_s


@SETTINGS
@given(configs(), st.floats(0.01, 0.9), st.sampled_from(["cpu", "gpu", "ssd", "all"]))
def test_impossible_budgets_give_a_minimum_that_fits(case, shrink, which):
    # The recompute backward: what the unconstrained plan needs is then the least any plan needs
    # (with `auto`, the unconstrained plans keep activations, and a smaller budget recomputes them).
    hf, b, state, device, _scale = case
    free = _plan(hf, b, state, device, {}, "always")
    low = {t: min(e.candidate.memory_bytes[t] for e in free.result.fitting) for t in ("cpu", "gpu", "ssd")}
    names = {"cpu": "cpu_mem_bytes", "gpu": "gpu_mem_bytes", "ssd": "ssd_bytes"}
    budgets = {names[t]: max(1, int(low[t] * (shrink if which in (t, "all") else 1.0))) for t in low}
    plan = _plan(hf, b, state, device, budgets, "always")
    assert plan.result.best is None
    need = plan.result.minimum_budgets
    assert set(need) == {"cpu", "gpu", "ssd"}
    again = _plan(hf, b, state, device, {names[t]: v for t, v in need.items()}, "always")
    assert again.result.best is not None
    assert all(again.result.best.candidate.memory_bytes[t] <= need[t] for t in need)


def test_70b_preset_plans_without_weights():
    plan = make_plan(PlanConfig(model="llama-70b", device="cuda", gpu_mem_bytes=70 << 30, cpu_mem_bytes=100 << 30, max_prefetch_depth=1), RATES)
    assert plan.fits and plan.shape.numel > 69e9
    assert plan.result.best.step_s <= plan.result.naive.step_s
    tiny = make_plan(PlanConfig(model="llama-70b", device="cuda", gpu_mem_bytes=70 << 30, cpu_mem_bytes=1 << 30, max_prefetch_depth=1), RATES)
    assert not tiny.fits and tiny.result.minimum_budgets["cpu"] > 1 << 30
