"""Model transform: swap the nn.Linear layers of decoder blocks for low-precision ones."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .linear import LowPrecisionConfig, check_shape, low_precision_linear


class LowPrecisionLinear(nn.Module):
    """nn.Linear whose GEMMs run in a low-precision recipe.

    It holds the very Parameters of the linear it replaces (same names `weight`, `bias`), so
    state dicts, optimizers and the store see no difference; weights stay in their own dtype and
    are quantized on the fly in each forward.
    """

    def __init__(self, linear: nn.Linear, config: LowPrecisionConfig):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_precision_linear(x, self.weight, self.bias, self.config)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.config.recipe}")


def _block_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of the repeated blocks: the elements of every nn.ModuleList.

    HF causal LMs keep their decoder layers in a ModuleList (model.layers, transformer.h, ...),
    while the embeddings and the LM head sit outside it.
    """
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefixes.extend(f"{name}.{i}." if name else f"{i}." for i in range(len(module)))
    return prefixes


def default_filter(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The filter convert_to_low_precision uses without filter_fn: linears inside decoder blocks."""
    prefixes = tuple(_block_prefixes(model))
    return lambda name, module: name.startswith(prefixes)


def convert_to_low_precision(
    model: nn.Module,
    recipe: str | LowPrecisionConfig = "fp8-blockwise",
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Swap nn.Linear modules for LowPrecisionLinear, in place; returns `model`.

    recipe: "fp8-blockwise" | "mxfp4" | "nvfp4", or a LowPrecisionConfig.
    filter_fn(qualified_name, linear) -> bool picks the layers; by default every nn.Linear inside
    a decoder block (an element of an nn.ModuleList), so embeddings and the LM head stay as they
    are. Under strict_shapes a layer whose features are not block multiples raises ValueError.
    Works on meta-device models (nothing is computed here).
    """
    config = recipe if isinstance(recipe, LowPrecisionConfig) else LowPrecisionConfig(recipe=recipe)
    keep = filter_fn or default_filter(model)
    chosen = [(name, m) for name, m in model.named_modules()
              if type(m) is nn.Linear and keep(name, m)]
    for name, linear in chosen:
        check_shape(config, linear.in_features, linear.out_features, name)
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LowPrecisionLinear(linear, config))
    return model
