import pytest
import torch

from fuyou.config import StateConfig
from fuyou.optim import KINDS, init_state_, state_layout


def make_parts(cfg: StateConfig, value: torch.Tensor) -> dict:
    """Fresh store parts of one parameter, initialised from `value`."""
    n = value.numel()
    parts = {k: {p.name: torch.empty(p.numel, dtype=p.dtype) for p in state_layout(cfg, k, n)} for k in KINDS}
    init_state_(cfg, value, parts)
    return parts


def clone_parts(parts: dict) -> dict:
    return {k: {name: t.clone() for name, t in d.items()} for k, d in parts.items()}


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
