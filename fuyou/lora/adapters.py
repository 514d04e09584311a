"""LoRA adapters beside the linears of a streamed, frozen base, with the semantics of the peft
library (its LoraConfig: r, lora_alpha, lora_dropout, target_modules, use_rslora).

Each target linear of a decoder layer gets a forward hook that adds, as peft's LoRA Linear does,
`lora_B(lora_A(x)) * scaling` to the base output (x cast to the adapters' dtype, the sum cast back
to the output's). The base weights stay in the store's slots; the adapters are ordinary
Parameters on the compute device, so the recompute and the kept-graph backward reach them like any
module parameter. Names are peft's saved names (`base_model.model.<module>.lora_A.weight`), so an
adapter saved here loads with `PeftModel.from_pretrained`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


def lora_config(settings, base_name: str = ""):
    """peft's LoraConfig for these settings (peft resolves default target modules by model type)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("--peft lora needs the peft package: pip install peft") from None
    targets = settings.target_modules
    if targets and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets or None,
                      use_rslora=settings.rslora, task_type="CAUSAL_LM", base_model_name_or_path=base_name or None)


def _target_modules(model: nn.Module, layer_modules: Dict[str, int], config) -> List[str]:
    """Names of the linears in decoder layers that `config` targets, in module order."""
    from peft.tuners.tuners_utils import check_target_module_exists

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _layer_of(n, layer_modules) is not None]
    if config.target_modules == "all-linear":
        return linears
    targets = config.target_modules
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        model_type = getattr(model.config, "model_type", None)
        if model_type not in defaults:
            raise ValueError(f"peft has no default LoRA target modules for {model_type}; pass --target-modules (e.g. q_proj,v_proj or all-linear)")
        config.target_modules = set(defaults[model_type])
    return [n for n in linears if check_target_module_exists(config, n)]


def _layer_of(name: str, layer_modules: Dict[str, int]) -> Optional[int]:
    for prefix, index in layer_modules.items():
        if name.startswith(prefix + "."):
            return index
    return None


def target_linears(skeleton, config, given: Optional[str]) -> List[str]:
    """The linears of the skeleton's decoder layers that peft's `config` adapts (none: an error naming the fix)."""
    names = _target_modules(skeleton.model, skeleton.layer_module_names(), config)
    if not names:
        raise ValueError(f"--target-modules {given}: no linear of the model's decoder layers matches; name its projections "
                         "(e.g. q_proj,v_proj) or pass all-linear")
    return names


def adapter_numel(skeleton, settings) -> int:
    """Parameters the adapters of `settings` would have on this skeleton: r x (in + out) per target
    linear; nothing is allocated (the planner sizes a run from the model's config alone)."""
    config = lora_config(settings)
    modules = dict(skeleton.model.named_modules())
    return sum(config.r * (modules[n].in_features + modules[n].out_features) for n in target_linears(skeleton, config, settings.target_modules))


class Adapters:
    """The run's LoRA adapters: one (A, B) pair per target linear, hooked into the skeleton."""

    def __init__(self, skeleton, settings, device: torch.device, *, seed: int = 0, base_name: str = ""):
        self.config = lora_config(settings, base_name)
        if self.config.lora_dropout:
            raise ValueError("--lora-dropout must be 0: the recompute in the backward would need the forward's dropout masks; pass --lora-dropout 0")
        r = self.config.r
        self.scaling = self.config.lora_alpha / (math.sqrt(r) if self.config.use_rslora else r)
        model = skeleton.model
        names = target_linears(skeleton, self.config, settings.target_modules)
        g = torch.Generator().manual_seed(seed)
        self.params: Dict[str, nn.Parameter] = {}
        self._hooks = []
        modules = dict(model.named_modules())
        for name in names:
            linear = modules[name]
            a = torch.empty(r, linear.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)  # peft's default init of lora_A; lora_B starts at 0
            pa = nn.Parameter(a.to(device))
            pb = nn.Parameter(torch.zeros(linear.out_features, r, device=device))
            self.params[f"{PEFT_PREFIX}{name}.lora_A.weight"] = pa
            self.params[f"{PEFT_PREFIX}{name}.lora_B.weight"] = pb
            self._hooks.append(linear.register_forward_hook(self._hook(pa, pb)))
        self.target_names = names

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        scaling = self.scaling

        def add_lora(_module, args, output):
            x = args[0]
            result = output + torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * scaling
            return result.to(output.dtype)

        return add_lora

    def parameters(self) -> List[nn.Parameter]:
        """In peft's order (module order; A before B), which is the order the norm is reduced in."""
        return list(self.params.values())

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def load(self, tensors: Dict[str, torch.Tensor], where: str) -> None:
        missing = sorted(set(self.params) - set(tensors))
        extra = sorted(set(tensors) - set(self.params))
        if missing or extra:
            raise ValueError(f"{where}: adapter tensors do not match this run's targets (missing {missing[:2]}, unexpected {extra[:2]}); "
                             "use the adapter's own --target-modules and --lora-r")
        with torch.no_grad():
            for name, p in self.params.items():
                t = tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, the run's is {tuple(p.shape)}; use the adapter's own --lora-r")
                p.copy_(t)

    def state(self, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", dtype).contiguous() for n, p in self.params.items()}

    def save_peft(self, directory: str, dtype: str = "fp32") -> None:
        """adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes them."""
        import os

        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        tensors = self.state({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
