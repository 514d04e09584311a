"""Cost model: simulated makespans of hand-made graphs whose schedules are known exactly."""
import pytest

from scheduler import Graph
from scheduler.costmodel import Rates, fit_rates, predict, simulate
from scheduler.trace import TraceEvent

# Unit rates: 1 byte/s and 1 FLOP/s, so sizes are seconds; absolute tolerance of float sums.
ONE = dict(read_Bps=1.0, write_Bps=1.0, h2d_Bps=1.0, d2h_Bps=1.0, compute_flops=1.0, optim_params_per_s=1.0)
TOL = 1e-9


def _noop():
    return None


def test_serial_chain_sums_durations():
    g = Graph()
    r = g.add("r", "read", "read", _noop, nbytes=3)
    c = g.add("c", "compute", "compute", _noop, [r], flops=5)
    w = g.add("w", "write", "write", _noop, [c], nbytes=2)
    g.add("o", "optim", "optim", _noop, [w], numel=7)
    p = predict(g, Rates(**ONE))
    assert p.step_s == pytest.approx(3 + 5 + 2 + 7, abs=TOL)
    assert p.critical_s == pytest.approx({"read": 3, "compute": 5, "write": 2, "optim": 7}, abs=TOL)
    assert p.bottleneck == "optim"
    assert p.bytes == {"read": 3, "compute": 0, "write": 2, "optim": 0}


def test_two_lanes_overlap_pipeline():
    """read i+1 overlaps compute i: makespan = first read + n computes when compute is slower."""
    g = Graph()
    prev_c = None
    n, read_s, comp_s = 5, 1.0, 2.0
    for i in range(n):
        r = g.add(f"r{i}", "read", "read", _noop, nbytes=int(read_s))
        prev_c = g.add(f"c{i}", "compute", "compute", _noop, [r, prev_c], flops=int(comp_s))
    p = predict(g, Rates(**ONE))
    assert p.step_s == pytest.approx(read_s + n * comp_s, abs=TOL)
    assert p.busy_s == pytest.approx({"read": n * read_s, "compute": n * comp_s}, abs=TOL)
    assert p.bottleneck == "compute"
    # The simulated trace shows the reads all back to back from time 0.
    reads = sorted((e.start_ns, e.end_ns) for e in p.trace.events if e.lane == "read")
    assert reads == [(int(i * 1e9), int((i + 1) * 1e9)) for i in range(n)]


def test_bottleneck_lane_bounds_makespan():
    """A slow write lane behind a fast compute lane: makespan = first compute + all writes."""
    g = Graph()
    prev = None
    for i in range(4):
        prev = g.add(f"c{i}", "compute", "compute", _noop, [prev], flops=1)
        g.add(f"w{i}", "write", "write", _noop, [prev], nbytes=3)
    p = predict(g, Rates(**ONE))
    assert p.step_s == pytest.approx(1 + 4 * 3, abs=TOL)
    assert p.bottleneck == "write"
    assert p.busy_fraction()["write"] == pytest.approx(12 / 13, abs=TOL)


def test_lane_threads_and_fifo_order():
    """Two threads on a lane run two tasks at once; a lane takes tasks in readiness order."""
    g = Graph()
    for i in range(4):
        g.add(f"r{i}", "read", "read", _noop, nbytes=2)
    assert predict(g, Rates(**ONE), lanes={"read": 2}).step_s == pytest.approx(4, abs=TOL)
    assert predict(g, Rates(**ONE)).step_s == pytest.approx(8, abs=TOL)
    g = Graph()
    slow = g.add("slow", "compute", "compute", _noop, flops=5)
    g.add("late", "read", "read", _noop, [slow], nbytes=1)
    g.add("early", "read", "read", _noop, nbytes=1)
    ev = {e.name: e for e in predict(g, Rates(**ONE)).trace.events}
    assert ev["early"].start_ns == 0 and ev["late"].start_ns == int(5e9)


def test_latency_and_call_overhead():
    g = Graph()
    g.add("c", "compute", "compute", _noop, flops=10, calls=3)
    g.add("r", "read", "read", _noop, nbytes=10)
    rates = Rates(**ONE, latency_s={"compute": 1.0, "read": 0.5}, compute_call_s=2.0)
    p = predict(g, rates)
    assert p.busy_s == pytest.approx({"compute": 1 + 3 * 2 + 10, "read": 10.5}, abs=TOL)


def test_simulate_rejects_wrong_duration_count():
    g = Graph()
    g.add("a", "read", "read", _noop)
    with pytest.raises(ValueError, match="1 tasks"):
        simulate(g, [1.0, 2.0])


@pytest.mark.parametrize("field", ["read_Bps", "compute_flops", "optim_params_per_s"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_rates_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        Rates(**{**ONE, field: value})


def test_rates_json_roundtrip_and_unknown_field():
    r = Rates(**ONE, latency_s={"write": 0.01}, compute_call_s=0.002)
    assert Rates.from_json(r.to_json()) == r
    with pytest.raises(ValueError, match="unknown rate field"):
        Rates.from_json({**r.to_json(), "disk": 1})
    with pytest.raises(ValueError, match="latency_s"):
        Rates(**ONE, latency_s={"bogus": 1.0})


def test_codec_optimizer_rates():
    r = Rates(**ONE, optim_by_codec={"fp8/bf16+rem": 5.0})
    assert Rates.from_json(r.to_json()) == r
    assert r.for_codec("fp8", "bf16+rem").optim_params_per_s == 5.0
    assert r.for_codec("fp32", "fp32") is r and r.for_codec("de8", "bf16+rem") is r  # not measured: the fp32 rate
    with pytest.raises(ValueError, match="optim_by_codec"):
        Rates(**ONE, optim_by_codec={"fp8/bf16+rem": 0.0})


def test_fp8_weights_add_their_encode_to_any_codec():
    """fp8 compute weights: their own measured rate where there is one; else the seconds per
    parameter the tiles' encode adds in fp32 mode, added to the codec's."""
    r = Rates(**{**ONE, "optim_params_per_s": 4.0}, optim_by_codec={"fp8/bf16+rem": 8.0, "fp32/fp32/fp8": 2.0})
    assert r.for_codec("fp32", "fp32", "fp8").optim_params_per_s == 2.0  # measured as such
    assert r.for_codec("fp8", "bf16+rem", "fp8").optim_params_per_s == pytest.approx(1 / (1 / 8 + (1 / 2 - 1 / 4)))
    assert r.for_codec("fp8", "bf16+rem", "bf16").optim_params_per_s == 8.0
    assert r.for_codec("de8", "bf16+rem", "fp8").optim_params_per_s == pytest.approx(1 / (1 / 4 + 1 / 4))  # no de8 rate: fp32's
    assert r.for_codec("fp32", "fp32", "fp32") is r


def test_cached_reads_take_the_copy_rate():
    g = Graph()
    g.add("disk", "read", "read", _noop, nbytes=4)
    g.add("cached", "read", "read", _noop, nbytes=0, copy_bytes=8)
    r = Rates(**ONE, copy_Bps=4.0)
    assert abs(predict(g, r).step_s - (4 + 8 / 4.0)) < TOL


def test_fit_rates_recovers_line():
    """Events generated from known latency + size/rate are fitted back exactly."""
    evs = []
    t = 0
    for i, size in enumerate([1e6, 3e6, 7e6, 2e6]):
        dur = 0.002 + size / 5e8
        evs.append(TraceEvent(f"r{i}", "read", "read", t, t + int(round(dur * 1e9)), nbytes=int(size)))
        cdur = 0.001 + size * 10 / 2e10
        evs.append(TraceEvent(f"c{i}", "compute", "compute", t, t + int(round(cdur * 1e9)), flops=int(size * 10)))
        evs.append(TraceEvent(f"o{i}", "optim", "optim", t, t + int(round(size / 1e8 * 1e9)), nbytes=int(size * 20), meta={"numel": int(size)}))
        t += 10**9
    fitted = fit_rates(evs, Rates(**ONE))
    assert fitted.read_Bps == pytest.approx(5e8, rel=1e-6)
    assert fitted.latency_s["read"] == pytest.approx(0.002, abs=1e-8)
    assert fitted.compute_flops == pytest.approx(2e10, rel=1e-6)
    assert fitted.latency_s["compute"] == pytest.approx(0.001, abs=1e-8)
    assert fitted.optim_params_per_s == pytest.approx(1e8, rel=1e-6)
    assert fitted.write_Bps == 1.0  # absent kinds keep the base rate
