"""The fused C++ AdamW against the torch references, element by element."""
import itertools

import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim import adamw_update_, fused, param_codecs
from fuyou.optim.codecs import SMALL_NUMEL

from .conftest import clone_parts, make_parts

needs_kernel = pytest.mark.skipif(not fused.available(), reason=f"fuyou._adam not built: {fused.import_error()}")

# Every kernel build this CPU runs (the portable one always).
ISAS = fused.isas() or [0]
CONFIGS = [
    StateConfig(weights=w, master=m, states=s)
    for s, m, w in itertools.product(("fp32", "bf16", "fp8", "de8", "log8"), ("fp32", "bf16+rem"), ("fp32", "bf16"))
]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _grad(n, step):
    scale = 10.0 ** (step % 3 - 1)  # gradients of changing size move every group's range
    return torch.randn(n) * scale * torch.exp(torch.randn(n))


def _assert_parts_equal(a, b):
    for kind in a:
        for name in a[kind]:
            x, y = a[kind][name], b[kind][name]
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{kind}.{name} differs"


@needs_kernel
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.states}-{c.master}-{c.weights}")
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
def test_fused_equals_reference_bitwise(seeded, cfg, isa):
    """Every stored byte equal after several steps (the reference uses the correctly rounded sqrt)."""
    n = SMALL_NUMEL + 2 * 128 + 37  # odd tail in the last fp8 group and de8 block
    ref = make_parts(cfg, torch.randn(n))
    out = clone_parts(ref)
    for step in range(1, 5):
        g = _grad(n, step)
        adamw_update_(cfg, g, ref, step=step, backend="torch", exact_sqrt=True, **HYPER)
        fused.adamw_fused_(param_codecs(cfg, n), g, out, step=step, isa=isa, threads=2, **HYPER)
        _assert_parts_equal(ref, out)


@needs_kernel
@pytest.mark.skipif(not fused.available() or fused.isas()[-1] < 2 or not fused._ext.has_avx512bf16(), reason="no AVX512-BF16 here")
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if "bf16" in (c.weights, c.states)], ids=lambda c: f"{c.states}-{c.master}-{c.weights}")
def test_avx512_without_the_bf16_instruction(seeded, cfg):
    """The AVX-512 build's integer bf16 rounding (where the CPU lacks AVX512-BF16) writes the same bytes."""
    n = SMALL_NUMEL + 2 * 128 + 37
    ref = make_parts(cfg, torch.randn(n))
    out = clone_parts(ref)
    for step in range(1, 3):
        g = _grad(n, step)
        adamw_update_(cfg, g, ref, step=step, backend="torch", exact_sqrt=True, **HYPER)
        fused.adamw_fused_(param_codecs(cfg, n), g, out, step=step, isa=2, bf16_insn=False, **HYPER)
        _assert_parts_equal(ref, out)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
def test_bf16_of_subnormal_values(isa):
    """bf16 weights and moments of subnormal values (which AVX512-BF16's conversion would flush to
    zero) equal the reference's rounding."""
    cfg = StateConfig(weights="bf16", master="fp32", states="bf16")
    n = SMALL_NUMEL
    w0 = torch.randn(n)
    w0[:64] = torch.rand(64) * 2.0**-127  # subnormal masters
    ref = make_parts(cfg, w0)
    out = clone_parts(ref)
    g = torch.randn(n) * 1e-20
    g[100:164] = torch.rand(64) * 2.0**-70  # m and v subnormal there
    adamw_update_(cfg, g, ref, step=1, lr=0.0, backend="torch", exact_sqrt=True)
    fused.adamw_fused_(param_codecs(cfg, n), g, out, step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, isa=isa)
    _assert_parts_equal(ref, out)
    assert int((out["weights"]["value"][:64].view(torch.int16) != 0).sum()) > 32  # not flushed


@needs_kernel
@pytest.mark.parametrize("n", [1, 127, SMALL_NUMEL - 1, 3 * 1024 + 5])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_sizes_and_threads(seeded, n, threads):
    cfg = StateConfig(weights="bf16", master="bf16+rem", states="fp8")
    ref = make_parts(cfg, torch.randn(n))
    out = clone_parts(ref)
    for step in (1, 2):
        g = _grad(n, step)
        adamw_update_(cfg, g, ref, step=step, backend="torch", **HYPER)
        adamw_update_(cfg, g, out, step=step, backend="fused", threads=threads, **HYPER)
    _assert_parts_equal(ref, out)


@needs_kernel
@pytest.mark.parametrize("beta1,grad_scale", [(0.3, 1.0), (0.9, 0.25), (0.0, 1.0)])
def test_fused_lerp_branches_and_grad_scale(seeded, beta1, grad_scale):
    """beta1 < 0.5 takes aten lerp's other formula; grad_scale multiplies the gradient first."""
    cfg = StateConfig(master="bf16+rem", states="de8")
    n = SMALL_NUMEL + 11
    ref = make_parts(cfg, torch.randn(n))
    out = clone_parts(ref)
    hyper = dict(HYPER, beta1=beta1)
    for step in (1, 2, 3):
        g = _grad(n, step)
        adamw_update_(cfg, g, ref, step=step, grad_scale=grad_scale, backend="torch", **hyper)
        adamw_update_(cfg, g, out, step=step, grad_scale=grad_scale, backend="fused", **hyper)
    _assert_parts_equal(ref, out)


def _beside_torch_adamw(cfg, n):
    """fuyou parts and a torch parameter with its torch.optim.AdamW, from the same random weights."""
    w0 = torch.randn(n)
    p = w0.clone().requires_grad_(True)
    return make_parts(cfg, w0), p, torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


@needs_kernel
def test_fused_kernel_against_torch_adamw(seeded):
    """The whole-update kernel in fp32 vs torch.optim.AdamW: moments bit-exact; master within the sqrt's
    rounding.

    torch's CPU sqrt (MKL VML) is not correctly rounded: about 20% of its results are 1 ulp off
    IEEE sqrt, so denom differs by 1 ulp there. One step then differs by at most 1 ulp of the new
    master plus 2^-22 of the step's update; the test checks that bound step by step (the master
    is re-synchronised from torch before each step) and that m, v stay bit-exact throughout.
    """
    n = 50_003
    parts, p, opt = _beside_torch_adamw(StateConfig(), n)
    for step in range(1, 6):
        g = _grad(n, step)
        before = p.detach().clone()
        parts["master"]["value"].copy_(before)
        p.grad = g.clone()
        opt.step()
        fused.adamw_fused_(param_codecs(StateConfig(), n), g, parts, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        state = opt.state[p]
        assert torch.equal(state["exp_avg"], parts["exp_avg"]["value"])
        assert torch.equal(state["exp_avg_sq"], parts["exp_avg_sq"]["value"])
        new = p.detach()
        update = (new - before * (1 - 1e-3 * 0.01)).abs()
        ulp = torch.nextafter(new.abs(), torch.tensor(float("inf"))) - new.abs()
        diff = (new - parts["master"]["value"]).abs()
        assert torch.all(diff <= ulp + update * 2.0**-22), f"step {step}: max diff {diff.max()}"
        assert torch.equal(parts["weights"]["value"], parts["master"]["value"])


def _sqrt_paths():
    """fp32 mode's ways to take torch's sqrt that this machine has: (SqrtKind or None, vmsSqrt's address)."""
    if not fused.available():
        return []
    paths = [(None, 0)]  # the two-phase update around torch.sqrt: always there
    addr = fused._vml_sqrt_symbol()
    if addr is not None and fused._matches_torch(fused._vml_call(addr)):
        paths.append((fused.SQRT_VML_CALL, addr))
    if fused.torch_sqrt_kind()[0] == fused.SQRT_VML_EX:
        paths.append((fused.SQRT_VML_EX, 0))
    return paths


SQRT_PATHS = _sqrt_paths()
_PATH_IDS = {None: "two-phase", fused.SQRT_VML_CALL: "vml-call", fused.SQRT_VML_EX: "vml-ex"}


@needs_kernel
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
@pytest.mark.parametrize("path", SQRT_PATHS, ids=lambda p: _PATH_IDS[p[0]])
def test_fp32_mode_is_torch_adamw_bit_for_bit(seeded, monkeypatch, weights, path):
    """fp32 mode on the fused backend (the kernel with torch's own sqrt: recomputed in registers,
    called per chunk, or around torch.sqrt in rounds of 4096) equals torch.optim.AdamW bit for bit,
    step after step without re-synchronising, with a gradient scale (clipping) on some steps; the
    weights are the master (fp32) or its bf16 rounding."""
    monkeypatch.setattr(fused, "TORCH_SQRT_CHUNK", 4096)
    monkeypatch.setitem(fused._TORCH_SQRT, "kind", path)
    n = 3 * 4096 + 1001  # a short last round, a partial last chunk
    cfg = StateConfig(weights=weights)
    parts, p, opt = _beside_torch_adamw(cfg, n)
    for step in range(1, 7):
        g = _grad(n, step)
        scale = 0.5 if step % 2 else 1.0
        p.grad = g * scale
        opt.step()
        adamw_update_(cfg, g, parts, step=step, lr=1e-3, weight_decay=0.01, grad_scale=scale, backend="fused")
        state = opt.state[p]
        assert torch.equal(parts["master"]["value"], p.detach()), f"step {step}: master differs"
        assert torch.equal(parts["exp_avg"]["value"], state["exp_avg"])
        assert torch.equal(parts["exp_avg_sq"]["value"], state["exp_avg_sq"])
        assert torch.equal(parts["weights"]["value"], p.detach().to(parts["weights"]["value"].dtype))


@needs_kernel
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
@pytest.mark.parametrize("path", [p for p in SQRT_PATHS if p[0] is not None], ids=lambda p: _PATH_IDS[p[0]])
def test_fp32_mode_one_pass_every_build(seeded, monkeypatch, isa, path):
    """Each kernel build's one-pass fp32 mode equals torch.optim.AdamW bit for bit (tiny values
    in v take the sqrt's special lanes)."""
    monkeypatch.setitem(fused._TORCH_SQRT, "kind", path)
    n = 2 * 1024 + 333
    parts, p, opt = _beside_torch_adamw(StateConfig(), n)
    for step in range(1, 4):
        g = _grad(n, step)
        g[:50] = 1e-25  # v ~ 1e-53: subnormal, the rsqrt path's special lanes
        p.grad = g.clone()
        opt.step()
        fused.adamw_torch_sqrt_(param_codecs(StateConfig(), n), g, parts, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.01, isa=isa, one_pass=True)
        assert torch.equal(parts["master"]["value"], p.detach()), f"step {step}: master differs"
        assert torch.equal(parts["exp_avg_sq"]["value"], opt.state[p]["exp_avg_sq"])


@needs_kernel
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
def test_recomputed_vml_sqrt_is_torch_sqrt(isa):
    """Where fp32 mode takes the recomputed vmsSqrt path, it equals torch.sqrt on 8 M random bit
    patterns (every sign, exponent and NaN payload) besides the probe it was chosen by."""
    if fused.torch_sqrt_kind()[0] != fused.SQRT_VML_EX:
        pytest.skip("this machine's torch.sqrt is not the generic vmsSqrt path: fp32 mode calls it instead")
    gen = torch.Generator().manual_seed(7)
    u = torch.randint(-(2**31), 2**31, (1 << 23,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = u.view(torch.float32)
    got = torch.empty_like(x)
    fused._ext.vml_ex_sqrt(x.data_ptr(), got.data_ptr(), x.numel(), isa)
    assert torch.equal(got.view(torch.int32), torch.sqrt(x).view(torch.int32))


@needs_kernel
def test_fused_rejects_bad_parts():
    cfg = StateConfig(states="fp8")
    n = SMALL_NUMEL
    parts = make_parts(cfg, torch.zeros(n))
    parts["exp_avg"]["absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg.absmax"):
        adamw_update_(cfg, torch.zeros(n), parts, step=1, lr=1e-3, backend="fused")


@needs_kernel
def test_torch_sqrt_path_needs_fp32_state():
    """The two-phase update exists for fp32 master and moments only; the kernel itself refuses the
    phases for other codecs and an apply phase without a root."""
    n = SMALL_NUMEL
    compressed = StateConfig(weights="bf16", master="bf16+rem", states="fp8")
    parts = make_parts(compressed, torch.zeros(n))
    with pytest.raises(ValueError, match="fp32 master and moments"):
        fused.adamw_torch_sqrt_(param_codecs(compressed, n), torch.zeros(n), parts, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.0)
    fp32 = make_parts(StateConfig(), torch.zeros(n))
    hyper = fused.hyper_values(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_scale=1.0)
    args = fused._kernel_args(param_codecs(StateConfig(), n), torch.zeros(n), fp32, hyper)
    with pytest.raises(ValueError, match="needs root"):
        fused._ext.adamw(*args, threads=1, phase=fused.PHASE_APPLY, root=0)
    with pytest.raises(ValueError, match="phase must be"):
        fused._ext.adamw(*args, threads=1, phase=3)


def test_backend_choice(monkeypatch):
    cfg = StateConfig()
    parts = make_parts(cfg, torch.ones(8))
    with pytest.raises(ValueError, match="AdamW backend"):
        adamw_update_(cfg, torch.ones(8), parts, step=1, lr=1e-3, backend="gpu")
    monkeypatch.setenv("FUYOU_ADAM_BACKEND", "torch")
    adamw_update_(cfg, torch.ones(8), parts, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="counts from 1"):
        adamw_update_(cfg, torch.ones(8), parts, step=0, lr=1e-3)


def test_without_extension_falls_back_to_torch(monkeypatch):
    """No fuyou._adam: auto picks the torch path; asking for the fused one names the fix."""
    monkeypatch.setattr(fused, "_ext", None)
    monkeypatch.setattr(fused, "_IMPORT_ERROR", "not built")
    monkeypatch.delenv("FUYOU_ADAM_BACKEND", raising=False)
    cfg = StateConfig(states="fp8", master="bf16+rem")
    n = SMALL_NUMEL + 1
    parts = make_parts(cfg, torch.ones(n))
    adamw_update_(cfg, torch.ones(n), parts, step=1, lr=1e-3)
    assert parts["exp_avg"]["absmax"][0] > 0
    with pytest.raises(RuntimeError, match="build_ext"):
        adamw_update_(cfg, torch.ones(n), parts, step=2, lr=1e-3, backend="fused")


def _grouped_extremes(n, signed):
    """Moments of every kind a group can hold: ordinary spread over decades, subnormal, huge, all
    zero, -0, one tiny value among ordinary ones."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    x[:256] = torch.rand(256, generator=gen) * 1e-40
    x[256:512] = torch.randn(256, generator=gen) * 1e18
    x[512:1024] = 0.0
    x[1024:1280] = -0.0
    x[1300] = 1e-44
    return x if signed else x.abs()


@needs_kernel
@pytest.mark.parametrize("states", ["fp8", "de8"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
def test_grouped_codecs_at_the_extremes(states, isa):
    """fp8 and de8 moments through the kernel's grouped path (AVX-512) and the portable one: subnormal,
    huge, zero and -0 groups, and enough elements (~130 k) that fp8's exact recheck of values near an
    E4M3 rounding midpoint runs; every stored byte equals the reference's after three steps."""
    n = 128 * 1024 + 77
    cfg = StateConfig(weights="bf16", master="bf16+rem", states=states)
    parts = make_parts(cfg, torch.randn(n))
    codec = param_codecs(cfg, n).moments
    codec.encode_(_grouped_extremes(n, True), parts["exp_avg"], signed=True)
    codec.encode_(_grouped_extremes(n, False), parts["exp_avg_sq"], signed=False)
    ref = clone_parts(parts)
    for step in (2, 3, 4):
        g = torch.randn(n) * 1e-3
        g[512:1280] = 0.0  # the zero groups stay zero
        adamw_update_(cfg, g, ref, step=step, lr=1e-3, backend="torch", exact_sqrt=True)
        fused.adamw_fused_(param_codecs(cfg, n), g, parts, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                           weight_decay=0.0, isa=isa, threads=2)
        _assert_parts_equal(ref, parts)


@needs_kernel
@pytest.mark.parametrize("smallest,k16", [(2.0**-8, 33), (2.0**-20, 16)], ids=["normal", "with-subnormal"])
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: fused.ISA_NAMES[i])
def test_fp8_values_at_rounding_midpoints(isa, smallest, k16):
    """New exp_avg values placed (to an ulp) where 448 (|x|/max)^k falls on a midpoint between two
    E4M3 values: the kernel's fast log2 cannot decide those, so it recomputes them exactly as the
    reference does; every byte must still equal the reference's. Groups with max 1 and smallest
    nonzero 2^-8 get k = 33/16: their values reach the normal midpoints and the upper subnormal
    ones. With 2^-20, k is 1 (its floor), and the values reach every midpoint, down to 2^-10."""
    from fuyou.optim.codec_ref import e4m3_values

    cfg = StateConfig(weights="fp32", master="fp32", states="fp8")
    groups = 64
    n = 128 * groups
    e4m3 = e4m3_values()[:127].double()
    mids = (e4m3[1:] + e4m3[:-1]) / 2
    targets = torch.zeros(groups, 128, dtype=torch.float64)
    targets[:, 0], targets[:, 1] = 1.0, smallest
    u = (mids / 448.0) ** (16.0 / k16)
    u = u[(u > smallest) & (u < 1.0)]
    if k16 == 16:
        assert u.numel() == mids.numel()  # every midpoint, down to half of 2^-9, is in reach
    for gi in range(groups):  # each group a different slice of the midpoints, signs alternating
        row = u[(torch.arange(126) + 7 * gi) % u.numel()]
        targets[gi, 2:] = row * torch.where(torch.arange(126) % 2 == 0, 1.0, -1.0)
    # m = 0 before, beta1 0.9: the new m is fl(0.1 g), so g = target / 0.1 puts it within an ulp.
    g = (targets.flatten() / 0.1).float()
    parts = make_parts(cfg, torch.randn(n))
    ref = clone_parts(parts)
    adamw_update_(cfg, g, ref, step=1, lr=1e-3, backend="torch", exact_sqrt=True)
    fused.adamw_fused_(param_codecs(cfg, n), g, parts, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0, isa=isa)
    assert int(ref["exp_avg"]["k16"][0]) == k16
    _assert_parts_equal(ref, parts)
