"""log8 moments: the reference's round trip and group rules, and the fused kernel's bytes equal to
the reference's on every build, including values no training produces (subnormal, huge, inf, NaN)."""
import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim import adamw_update_, fused, param_codecs
from fuyou.optim.codec_ref import LOG8_GROUP, LOG8_K16_MIN, log8_decode_ref, log8_encode_ref, log8_group_params_ref
from fuyou.optim.codecs import MOMENT_REGISTRY, SMALL_NUMEL

from .conftest import clone_parts, make_parts

ISAS = fused.isas()
needs_kernel = pytest.mark.skipif(not fused.available(), reason=f"fuyou._adam not built: {fused.import_error()}")


def _roundtrip(x, signed):
    codes, absmax, k16 = log8_encode_ref(x, signed=signed)
    return log8_decode_ref(codes, absmax, k16, x.numel(), signed=signed), codes, absmax, k16


@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_within_one_step(seeded, signed):
    """A code step is 2/k16 octave on the bit pattern: |error| <= 2/k16 of the value (a step spans
    at most one binade change, where the pattern's unit doubles), for every value inside the
    group's range (codes 2 and up: code 0 is a flushed exp_avg value, code 1 may hold an exp_avg_sq
    value raised from below the range)."""
    n = 40 * LOG8_GROUP + 17
    x = torch.randn(n) * torch.exp(torch.randn(n))
    x = x if signed else x.abs()
    y, codes, _, k16 = _roundtrip(x, signed)
    k = k16.double()[torch.arange(n) // LOG8_GROUP]
    inside = (codes.long() & (0x7F if signed else 0xFF)) >= 2
    assert inside.float().mean() > 0.9  # exp_avg flushes what lies below 2^-7.9 of its group max (k16 >= 32): ~8% here
    err = (y.double() - x.double()).abs() / x.double().abs()
    assert torch.all(err[inside] <= 2 / k[inside]), f"worst {float((err * k / 2)[inside].max()):.3f} steps"
    assert torch.equal(torch.sign(y[inside]), torch.sign(x[inside]))


def test_signed_flushes_below_its_range_unsigned_never_zero():
    """Below k16 = 32 exp_avg flushes its smallest values to zero; exp_avg_sq keeps every nonzero
    value at code 1 or above (a zero v would turn m/(sqrt(v)+eps) into m/eps)."""
    x = torch.ones(LOG8_GROUP)
    x[1:4] = torch.tensor([2.0**-60, 2.0**-100, 2.0**-20])
    ys, codes_s, _, k_s = _roundtrip(x, True)
    yu, codes_u, _, k_u = _roundtrip(x, False)
    assert int(k_s[0]) == LOG8_K16_MIN[True] and int(k_u[0]) == LOG8_K16_MIN[False]
    assert ys[1] == 0 and ys[2] == 0 and ys[0] == 1.0
    assert torch.all(codes_u > 0) and torch.all(yu > 0)
    assert yu[1] >= x[1] and yu[2] >= x[2]  # raised to the smallest code: a smaller step, never a larger one


def test_group_rules():
    x = torch.zeros(3 * LOG8_GROUP)
    x[LOG8_GROUP : 2 * LOG8_GROUP] = -0.75  # constant magnitude: the densest k16
    x[2 * LOG8_GROUP + 3] = 3.0  # one nonzero element
    x[2 * LOG8_GROUP + 4] = -0.0
    y, codes, absmax, k16 = _roundtrip(x, True)
    assert k16.tolist() == [16, 255, 255] and absmax.tolist() == [0.0, 0.75, 3.0]
    assert torch.all(codes[:LOG8_GROUP] == 0) and torch.all(y[:LOG8_GROUP] == 0)
    assert torch.equal(y[LOG8_GROUP : 2 * LOG8_GROUP], x[LOG8_GROUP : 2 * LOG8_GROUP])
    assert y[2 * LOG8_GROUP + 3] == 3.0 and int(codes[2 * LOG8_GROUP + 4]) == 0  # -0 is code 0, no sign
    M, k = log8_group_params_ref(x, signed=False)
    assert M[1] == x[LOG8_GROUP:].abs().view(torch.int32)[0] and int(k[1]) == 255


def test_registry_entry():
    codec = MOMENT_REGISTRY["log8"]
    assert codec.kernel_id == 4 and codec.group == LOG8_GROUP
    assert [p.name for p in codec.layout(SMALL_NUMEL)] == ["codes", "absmax", "k16"]
    assert codec.bytes_per_element(1 << 20) == pytest.approx(1 + 5 / LOG8_GROUP)


def _extremes(n):
    """Groups of every kind a trained state can hold: ordinary, subnormal, huge, all zero, -0, tiny."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    g = LOG8_GROUP
    x[:g] = torch.rand(g, generator=gen) * 1e-40  # subnormal
    x[g : 2 * g] = torch.randn(g, generator=gen) * 1e37
    x[2 * g : 3 * g] = 0.0
    x[3 * g : 4 * g] = -0.0
    x[4 * g : 5 * g] = 1e-30
    x[5 * g + 7] = 1e-44  # one subnormal among ordinary values
    return x


def test_nan_and_inf_are_total():
    """NaN keeps its bits as the largest |x| (its group decodes it as NaN); inf likewise; nothing raises."""
    x = torch.randn(2 * LOG8_GROUP)
    x[3], x[LOG8_GROUP + 1] = float("nan"), float("-inf")
    y, codes, absmax, _ = _roundtrip(x, True)
    assert torch.isnan(y[3]) and torch.isnan(absmax[0])
    assert y[LOG8_GROUP + 1] == float("-inf") and absmax[1] == float("inf")


@needs_kernel
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
@pytest.mark.parametrize("master", ["fp32", "bf16+rem"])
def test_kernel_bytes_are_the_reference_at_the_extremes(seeded, isa, master):
    """Moments holding subnormal, huge, zero and -0 groups: after two steps every stored byte of
    the kernel equals the reference's."""
    n = 40 * LOG8_GROUP + 77  # >= SMALL_NUMEL: smaller tensors keep fp32 moments
    cfg = StateConfig(weights="bf16", master=master, states="log8")
    parts = make_parts(cfg, torch.randn(n))
    MOMENT_REGISTRY["log8"].encode_(_extremes(n), parts["exp_avg"], signed=True)
    MOMENT_REGISTRY["log8"].encode_(_extremes(n).abs(), parts["exp_avg_sq"], signed=False)
    ref = clone_parts(parts)
    for step in (2, 3):
        g = torch.randn(n) * 1e-3
        g[2 * LOG8_GROUP : 4 * LOG8_GROUP] = 0.0  # keep the zero groups zero
        adamw_update_(cfg, g, ref, step=step, lr=1e-3, backend="torch", exact_sqrt=True)
        fused.adamw_fused_(param_codecs(cfg, n), g, parts, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                           weight_decay=0.0, isa=isa)
        for kind in ref:
            for name in ref[kind]:
                assert torch.equal(parts[kind][name].view(torch.uint8), ref[kind][name].view(torch.uint8)), f"step {step}: {kind}.{name}"
    assert int(ref["exp_avg"]["absmax"][2]) == 0 and int(ref["exp_avg"]["k16"][2]) == 16  # the zero group stayed zero
