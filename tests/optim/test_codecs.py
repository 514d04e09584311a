"""Codec references: round trips, group edge cases, layouts and the bytes-per-step accounting."""
import math

import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim import bytes_per_param_step, state_layout
from fuyou.optim.codec_ref import (
    DE8_BLOCK,
    E4M3_MAX,
    FP8_GROUP,
    de8_bucket_table,
    dynamic_map,
    e4m3_values,
    f32_from_bits,
    fp8_group_params_ref,
)
from fuyou.optim.codecs import SMALL_NUMEL, WEIGHTS_REGISTRY, master_codec, moment_codec

# Tolerance table (relative error of one encode/decode round trip, normal E4M3 range):
#   fp8: E4M3 keeps 3 mantissa bits, so y = 448 (|x|/mx)^k is off by at most 2^-4 relative; in x
#        that is (1 + 2^-4)^(1/k) - 1 <= 2^-4 (k >= 1), plus fp32 rounding of the table and gain.
#   bf16: 2^-8 relative (round to nearest, 8 significant bits).
FP8_RTOL = 2.0**-4 + 1e-6
BF16_RTOL = 2.0**-8


def _parts(codec, n):
    return {p.name: torch.zeros(p.numel, dtype=p.dtype) for p in moment_codec(codec, n).layout(n)}


def _roundtrip(codec, x, signed=True):
    parts = _parts(codec, x.numel())
    moment_codec(codec, x.numel()).encode_(x, parts, signed=signed)
    return moment_codec(codec, x.numel()).decode(parts, x.numel(), signed=signed), parts


@pytest.mark.parametrize("n", [SMALL_NUMEL, SMALL_NUMEL + 1, 5000, 3 * FP8_GROUP * 16 + 77])
def test_fp8_roundtrip_within_half_step(seeded, n):
    x = torch.randn(n) * torch.exp(torch.randn(n) * 2)
    y, parts = _roundtrip("fp8", x)
    mx, k16 = fp8_group_params_ref(x)
    group = torch.arange(n) // FP8_GROUP
    k = k16.double()[group] / 16
    yq = E4M3_MAX * (x.double().abs() / mx.double()[group]) ** k
    normal = yq >= 2.0**-6  # subnormal E4M3 codes have absolute, not relative, steps
    assert normal.float().mean() > 0.9
    torch.testing.assert_close(y[normal], x[normal], rtol=FP8_RTOL, atol=0)
    assert torch.equal(torch.sign(y[y != 0]), torch.sign(x[y != 0]))
    assert parts["codes"].numel() == n and parts["absmax"].numel() == math.ceil(n / FP8_GROUP)


def test_fp8_group_guards(seeded):
    n = SMALL_NUMEL + 200  # the last group holds 72 elements
    x = torch.randn(n)
    x[:FP8_GROUP] = 0.0  # all-zero group
    x[FP8_GROUP : 2 * FP8_GROUP] = -0.75  # constant magnitude: mx/mn = 1 -> k capped
    x[2 * FP8_GROUP : 3 * FP8_GROUP] = 0.0
    x[2 * FP8_GROUP + 5] = 3.0  # one nonzero element
    y, parts = _roundtrip("fp8", x)
    assert torch.equal(y[:FP8_GROUP], torch.zeros(FP8_GROUP))
    torch.testing.assert_close(y[FP8_GROUP : 2 * FP8_GROUP], x[FP8_GROUP : 2 * FP8_GROUP], rtol=1e-6, atol=0)
    torch.testing.assert_close(y[2 * FP8_GROUP : 3 * FP8_GROUP], x[2 * FP8_GROUP : 3 * FP8_GROUP], rtol=1e-6, atol=0)
    assert int(parts["k16"][1]) == 255 and int(parts["k16"][0]) == 16
    assert torch.all(parts["k16"] >= 16)


def test_fp8_k_follows_group_range():
    n = SMALL_NUMEL
    x = torch.ones(n)
    x[0] = 2.0**-10  # mx/mn = 2^10: k = floor(log2(448^2/2) / 10 * 16) / 16
    _, parts = _roundtrip("fp8", x)
    assert int(parts["k16"][0]) == math.floor(math.log2(448.0**2 / 2) / 10 * 16)
    x[0] = 2.0**-40  # range beyond E4M3: k clamps to 1
    _, parts = _roundtrip("fp8", x)
    assert int(parts["k16"][0]) == 16


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [SMALL_NUMEL + 3, 2 * DE8_BLOCK * 9 + 1])
def test_de8_picks_nearest_map_entry(seeded, signed, n):
    x = torch.randn(n) * torch.exp(torch.randn(n))
    if not signed:
        x = x.abs()
    y, parts = _roundtrip("de8", x, signed=signed)
    values, _ = dynamic_map(signed)
    block = torch.arange(n) // DE8_BLOCK
    padded = torch.nn.functional.pad(x.abs(), (0, (-n) % DE8_BLOCK))
    absmax = padded.view(-1, DE8_BLOCK).amax(dim=1)
    u = x / absmax[block]
    nearest = (u.unsqueeze(1) - values.unsqueeze(0)).abs().argmin(dim=1)
    dist_chosen = (u - values[parts["codes"].long()]).abs()
    dist_best = (u - values[nearest]).abs()
    torch.testing.assert_close(dist_chosen, dist_best, rtol=0, atol=1e-7)
    torch.testing.assert_close(y, values[parts["codes"].long()] * absmax[block], rtol=0, atol=0)


def test_dynamic_map_shape():
    for signed in (True, False):
        values, mids = dynamic_map(signed)
        assert values.numel() == 256 and mids.numel() == 255
        assert torch.all(values[1:] > values[:-1])
        assert values.max() == 1.0 and (values == 0).sum() == 1
    assert dynamic_map(False)[0].min() == 0.0
    assert dynamic_map(True)[0].min() < -0.99


def test_bf16_moment_roundtrip(seeded):
    x = torch.randn(SMALL_NUMEL + 9)
    y, _ = _roundtrip("bf16", x)
    torch.testing.assert_close(y, x, rtol=BF16_RTOL, atol=0)


def test_bf16_rem_master_is_exact(seeded):
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.4028235e38, 1e-45, -1e-40, float("inf"), float("-inf"), 1.00390625, 1.0 + 2**-9])
    x = torch.cat([torch.randn(SMALL_NUMEL), specials, torch.randn(7) * 1e-30])
    parts = {p.name: torch.zeros(p.numel, dtype=p.dtype) for p in state_layout(StateConfig(master="bf16+rem"), "master", x.numel())}
    assert set(parts) == {"hi", "lo"}
    master_codec("bf16+rem", x.numel()).encode_(x, parts)
    back = master_codec("bf16+rem", x.numel()).decode(parts, x.numel())
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))
    # The high half is a usable bf16 weight: within half a bf16 step of the value.
    finite = torch.isfinite(x) & (x.abs() < 3e38)
    torch.testing.assert_close(parts["hi"].float()[finite], x[finite], rtol=BF16_RTOL, atol=1e-38)


def test_small_tensors_stay_fp32():
    cfg = StateConfig(weights="bf16", master="bf16+rem", states="fp8")
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        layout = state_layout(cfg, kind, SMALL_NUMEL - 1)
        assert [(p.name, p.dtype) for p in layout] == [("value", torch.float32)]
    assert state_layout(cfg, "weights", 10)[0].dtype == torch.bfloat16


def test_e4m3_table_matches_torch():
    v = e4m3_values()
    assert v[0x7E] == 448.0 and v[0x08] == 2.0**-6 and v[0x01] == 2.0**-9 and torch.isnan(v[0x7F])


def test_bytes_per_param_step():
    fp32 = bytes_per_param_step(StateConfig(weights="bf16"))
    assert fp32["total"] == pytest.approx(2 * 2 + 3 * 4 * 2 + 2)  # 30 B
    assert bytes_per_param_step(StateConfig())["total"] == pytest.approx(36.0)
    small = bytes_per_param_step(StateConfig(weights="bf16", master="bf16+rem", states="fp8"))
    per_moment = 1 + 5 / FP8_GROUP  # code byte + fp32 absmax and k16 byte per group of 128
    assert small["exp_avg_read"] == pytest.approx(per_moment)
    assert small["total"] == pytest.approx(2 * 2 + 2 * 4 + 4 * per_moment + 2)
    de8 = bytes_per_param_step(StateConfig(weights="bf16", master="bf16+rem", states="de8"))
    assert de8["exp_avg_sq_write"] == pytest.approx(1 + 4 / DE8_BLOCK)


def test_bad_codec_names():
    with pytest.raises(ValueError, match="optimizer-state codec"):
        StateConfig(states="fp4")
    with pytest.raises(ValueError, match="master codec"):
        StateConfig(master="bf16")
    with pytest.raises(ValueError, match="unknown state kind"):
        state_layout(StateConfig(), "grad", 10)


def test_de8_signed_map_is_symmetric_around_its_zero():
    """The AVX-512 decode of exp_avg looks up |code - 127| among the map's 128 magnitudes and sets
    the sign: that is the map only if map[127 + d] = -map[127 - d] bit for bit and map[255] = 1."""
    values, _ = dynamic_map(True)
    d = torch.arange(1, 128)
    assert torch.equal(values[127 + d].view(torch.int32), (-values[127 - d]).view(torch.int32))
    assert values[127].item() == 0.0 and not math.copysign(1.0, values[127].item()) < 0
    assert values[255].item() == 1.0


@pytest.mark.parametrize("signed", [True, False])
def test_de8_bucket_table_is_the_nearest_search(seeded, signed):
    """The fused kernel's one-gather search (the entry of u's top 16 bits: the count below the bucket
    and the bucket's midpoint, one compare) equals bucketize over the midpoints, at random points,
    at the midpoints themselves and at the edges."""
    values, mids = dynamic_map(signed)
    table = de8_bucket_table(signed).long() & 0xFFFFFFFF
    u = torch.cat([
        torch.rand(100_000) * 2 - 1,
        torch.exp(-torch.rand(50_000) * 20) * torch.sign(torch.randn(50_000)),
        mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45]),
    ])
    if not signed:
        u = u.abs()
    bits = u.view(torch.int32).long() & 0xFFFFFFFF
    entry = table[bits >> 16]
    mid = f32_from_bits((bits & 0xFFFF0000) | (entry >> 16))
    probe = (entry & 0xFF) + (mid < u).long()
    assert torch.equal(probe, torch.bucketize(u, mids))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130)], ids=["whole-tiles", "edge-tiles"])
def test_fp8_weights_codec_is_the_reference_bit_for_bit(seeded, shape):
    """The fp8 weights codec's encode (a broadcast over the tiles where N and K are whole tiles) and
    its decode on the C++ core write and give the bits of kernels.reference's quantize / dequantize,
    special values included (a zero tile, inf, NaN, values beyond 448 times the scale's tile max).
    Without the C++ core the decode is the reference itself: only the encode is checked then."""
    from fuyou.kernels.reference import dequantize_weight_fp8, quantize_weight_fp8
    from fuyou.optim import fused

    n, k = shape
    x = torch.randn(n, k) * torch.exp(torch.randn(n, k) * 2)
    x[:128, :128] = 0.0
    x[130, 5], x[131, 6], x[140, 300 % k] = float("inf"), float("nan"), -1e30
    codec = WEIGHTS_REGISTRY["fp8"]
    parts = {p.name: torch.empty(p.numel, dtype=p.dtype) for p in codec.layout(n * k, shape)}
    codec.encode_(x.reshape(-1), parts, shape=shape)
    codes, scales = quantize_weight_fp8(x)
    assert torch.equal(parts["codes"], codes.view(torch.uint8).reshape(-1))
    assert torch.equal(parts["scales"].view(torch.int32), scales.reshape(-1).view(torch.int32))
    if fused.available():
        got = codec.decode(parts, n * k)
        want = dequantize_weight_fp8(codes, scales, shape).reshape(-1)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
