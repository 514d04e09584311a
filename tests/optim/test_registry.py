"""The codec registry: the names StateConfig accepts, the kernel's ids and groups, the resolvers'
size and shape rules, and updates that refuse parts of another codec."""
import pathlib
import re

import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim import KINDS, adamw_update_, decode_weights, fused, init_state_, param_codecs, state_layout
from fuyou.optim.codecs import (
    MASTER_CODECS,
    MASTER_REGISTRY,
    MOMENT_REGISTRY,
    SMALL_NUMEL,
    STATE_CODECS,
    WEIGHTS_REGISTRY,
    master_codec,
    moment_codec,
    weights_codec,
)
from fuyou.optim.state import WEIGHT_DTYPES

ADAM_H = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "adam" / "adam.h"


def test_registry_names_are_the_names_state_config_accepts():
    assert tuple(WEIGHTS_REGISTRY) == tuple(WEIGHT_DTYPES)
    assert tuple(MASTER_REGISTRY) == MASTER_CODECS
    assert tuple(MOMENT_REGISTRY) == STATE_CODECS
    for name in WEIGHTS_REGISTRY:
        assert StateConfig(weights=name).weights == name
    for name in MASTER_REGISTRY:
        assert StateConfig(master=name).master == name
    for name in MOMENT_REGISTRY:
        assert StateConfig(states=name).states == name


@pytest.mark.parametrize("registry,serves", [(WEIGHTS_REGISTRY, "weights"), (MASTER_REGISTRY, "master"), (MOMENT_REGISTRY, "moment")])
def test_each_codec_serves_its_registry(registry, serves):
    assert all(c.serves == serves and c.name == name for name, c in registry.items())


def test_kernel_ids_and_groups_are_the_kernels():
    """Ids and group sizes equal csrc/adam/adam.h's enums and constants (kState*, kMaster*, kWeights*)."""
    header = ADAM_H.read_text()
    enums = {f"{sort}{fmt}": int(v) for sort, fmt, v in re.findall(r"\bk(State|Master|Weights)(\w+) = (\d+)", header)}
    suffix = lambda name: name.replace("+", " ").title().replace(" ", "")  # noqa: E731 - "bf16+rem" -> "Bf16Rem"
    for sort, registry in (("Weights", WEIGHTS_REGISTRY), ("Master", MASTER_REGISTRY), ("State", MOMENT_REGISTRY)):
        for name, codec in registry.items():
            assert codec.kernel_id == enums.get(sort + suffix(name)), f"{sort} codec {name}"
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", header)}
    assert MOMENT_REGISTRY["fp8"].group == consts["kFp8Group"]
    assert MOMENT_REGISTRY["de8"].group == consts["kDe8Block"]
    assert MOMENT_REGISTRY["log8"].group == consts["kLog8Group"]
    assert all(MOMENT_REGISTRY[n].group == 0 for n in ("fp32", "bf16")) and MASTER_REGISTRY["bf16+rem"].group == 0


def test_bytes_per_element_count_the_scales():
    n = 1 << 20
    assert MOMENT_REGISTRY["fp8"].bytes_per_element(n) == pytest.approx(1 + 5 / 128)
    assert MOMENT_REGISTRY["de8"].bytes_per_element(n) == pytest.approx(1 + 4 / 256)
    assert MOMENT_REGISTRY["bf16"].bytes_per_element(n) == 2.0
    assert MASTER_REGISTRY["bf16+rem"].bytes_per_element(n) == 4.0
    assert WEIGHTS_REGISTRY["fp8"].bytes_per_element(n, (1024, 1024)) == pytest.approx(1 + (64 * 4 + 16) / n)


def test_resolvers_keep_small_tensors_fp32_and_tile_only_matrices():
    assert moment_codec("fp8", SMALL_NUMEL - 1) is MOMENT_REGISTRY["fp32"]
    assert moment_codec("fp8", SMALL_NUMEL) is MOMENT_REGISTRY["fp8"]
    assert master_codec("bf16+rem", SMALL_NUMEL - 1) is MASTER_REGISTRY["fp32"]
    assert master_codec("bf16+rem", SMALL_NUMEL) is MASTER_REGISTRY["bf16+rem"]
    assert weights_codec("bf16", 10) is WEIGHTS_REGISTRY["bf16"]  # weights keep their dtype at any size
    assert weights_codec("fp8", SMALL_NUMEL, (64, 64)) is WEIGHTS_REGISTRY["fp8"]
    for numel, shape in ((SMALL_NUMEL, (SMALL_NUMEL,)), (SMALL_NUMEL, None), (32 * 32, (32, 32))):
        assert weights_codec("fp8", numel, shape) is WEIGHTS_REGISTRY["bf16"]
    with pytest.raises(ValueError, match="optimizer-state codec 'fp4' unknown"):
        moment_codec("fp4", SMALL_NUMEL)
    with pytest.raises(ValueError, match="master codec 'bf16' unknown"):
        master_codec("bf16", 10)


@pytest.mark.parametrize("backend", ["torch", pytest.param("fused", marks=pytest.mark.skipif(not fused.available(), reason="fuyou._adam not built"))])
def test_update_refuses_fp8_weight_parts_without_their_shape(seeded, backend):
    """fp8 weights are tiles of a 2-D parameter: an update told no shape would take them for bf16."""
    cfg = StateConfig(weights="fp8", master="bf16+rem", states="fp8")
    value = torch.randn(64, 96)
    parts = {k: {p.name: torch.zeros(p.numel, dtype=p.dtype) for p in state_layout(cfg, k, value.numel(), value.shape)} for k in KINDS}
    init_state_(cfg, value, parts)
    assert param_codecs(cfg, value.numel(), value.shape).weights is WEIGHTS_REGISTRY["fp8"]
    grad = torch.randn(value.numel())
    with pytest.raises(ValueError, match="weights.* codec 'bf16'"):
        adamw_update_(cfg, grad, parts, step=1, lr=1e-3, backend=backend)
    adamw_update_(cfg, grad, parts, shape=value.shape, step=1, lr=1e-3, backend=backend)
    assert parts["weights"]["dims"].tolist() == [64, 96]
    torch.testing.assert_close(decode_weights(cfg, parts["weights"], value.shape), value.reshape(-1), rtol=2**-3, atol=3e-3)
