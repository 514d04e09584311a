"""The torch reference path of adamw_update_ against torch.optim.AdamW (no extension needed)."""
import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim import adamw_step_, adamw_update_, decode_master, decode_state

from .conftest import make_parts


@pytest.mark.parametrize("exact_sqrt", [False, True])
def test_reference_path_fp32_matches_adamw_step(seeded, exact_sqrt):
    """backend="torch" in fp32 mode is adamw_step_ bit for bit: with torch's sqrt by default (as
    torch.optim.AdamW), with the correctly rounded one when asked (as the fused kernel)."""
    n = 10_007
    cfg = StateConfig()
    w0 = torch.randn(n)
    parts = make_parts(cfg, w0)
    p, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, 4):
        g = torch.randn(n)
        adamw_step_(p, g, m, v, step=step, lr=1e-2, weight_decay=0.1, exact_sqrt=exact_sqrt)
        adamw_update_(cfg, g, parts, step=step, lr=1e-2, weight_decay=0.1, backend="torch", exact_sqrt=exact_sqrt if exact_sqrt else None)
    assert torch.equal(parts["master"]["value"], p)
    assert torch.equal(parts["exp_avg"]["value"], m)
    assert torch.equal(parts["exp_avg_sq"]["value"], v)


def test_adamw_step_is_torch_adamw(seeded):
    """Without exact_sqrt, adamw_step_ is torch.optim.AdamW (single tensor) bit for bit."""
    n = 4099
    w0 = torch.randn(n)
    p_ref = w0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([p_ref], lr=1e-3, weight_decay=0.01, foreach=False)
    p, m, v = w0.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, 4):
        g = torch.randn(n)
        p_ref.grad = g.clone()
        opt.step()
        adamw_step_(p, g, m, v, step=step, lr=1e-3, weight_decay=0.01)
    assert torch.equal(p, p_ref.detach())


@pytest.mark.parametrize("states", ["bf16", "fp8", "de8"])
def test_compressed_states_track_fp32(seeded, states):
    """A few steps with compressed moments stay close to fp32 AdamW (quantisation error only).

    Tolerances: each step moves a weight by at most ~lr; the compressed moments perturb m/sqrt(v)
    by a few percent (docs/optim.md), so after 5 steps the master differs by < 5 * lr * 0.2. Each
    encode of m errs by at most STEP_ERR * max|m| (bf16 and fp8: half a mantissa step relative to
    the value; de8: half the widest map step relative to the block absmax), so 5 steps by 5x that.
    """
    n = 8192
    w0 = torch.randn(n)
    exact = make_parts(StateConfig(), w0)
    comp_cfg = StateConfig(master="bf16+rem", weights="bf16", states=states)
    comp = make_parts(comp_cfg, w0)
    lr = 1e-3
    for step in range(1, 6):
        g = torch.randn(n)
        adamw_update_(StateConfig(), g, exact, step=step, lr=lr, backend="torch")
        adamw_update_(comp_cfg, g, comp, step=step, lr=lr, backend="torch")
    torch.testing.assert_close(decode_master(comp_cfg, comp["master"], n), exact["master"]["value"], rtol=0, atol=5 * lr * 0.2)
    m = decode_state(comp_cfg, "exp_avg", comp["exp_avg"], n)
    m_exact = exact["exp_avg"]["value"]
    step_err = {"bf16": 2.0**-8, "fp8": 2.0**-4, "de8": 0.9 / 64 / 2}[states]
    torch.testing.assert_close(m, m_exact, rtol=0, atol=5 * step_err * m_exact.abs().max().item())
    torch.testing.assert_close(comp["weights"]["value"].float(), decode_master(comp_cfg, comp["master"], n), rtol=2**-8, atol=0)
