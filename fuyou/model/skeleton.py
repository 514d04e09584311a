"""A Hugging Face causal LM as a weightless skeleton, cut into blocks.

The model is built with every parameter on the meta device (buffers such as rotary frequencies are
real: they are small and computed from the config). Blocks: the embedding (everything before the
first decoder layer), each decoder layer, and the head (final norm + LM head). A tied LM head
belongs to the embedding block; the head block borrows it.

Parameters are materialized per block by `attach` (views of a buffer the runtime owns) and put back
on meta by `detach`: the skeleton itself never holds weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

EMBED = "embed"
HEAD = "head"


class UnsupportedModelError(ValueError):
    """The architecture cannot be run block by block."""


@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device, buffers for real (nothing is initialised)."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        orig(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


@dataclass
class ParamInfo:
    """A parameter of the model: its canonical name, shape, and every (module, attribute) holding it."""

    name: str
    shape: Tuple[int, ...]
    refs: List[Tuple[nn.Module, str]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Block:
    name: str
    index: int
    params: List[str]  # canonical names of the parameters this block owns (and stores)
    borrowed: List[Tuple[str, str]] = field(default_factory=list)  # (owner block, param) also used

    @property
    def is_layer(self) -> bool:
        return self.name.startswith("layer")


def layer_block_name(i: int) -> str:
    return f"layer{i:04d}"


class Skeleton:
    """The meta-device model plus its block partition. See module docstring."""

    def __init__(self, hf_config, *, attn_implementation: str = "sdpa", linear: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        self.config = hf_config
        try:
            with _params_on_meta():
                model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation, dtype=torch.float32)
        except ValueError as exc:
            arch = getattr(hf_config, "architectures", None) or [type(hf_config).__name__]
            raise UnsupportedModelError(
                f"{arch[0]} is not a causal language model transformers can build ({exc}); use a decoder-only *ForCausalLM checkpoint"
            ) from None
        model.eval()  # dropout off: the backward recomputes each block and must see the same forward
        if linear is not None:
            from ..kernels import convert_to_low_precision

            # Same Parameter objects under the same names: the partition and the store are unchanged.
            convert_to_low_precision(model, linear)
        self.model = model
        self._check_supported()
        self.base = model.base_model
        self.layers = self._find_layers()
        self.embedding = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.final_norms = self._find_final_norms()
        self.params: Dict[str, ParamInfo] = {}
        self.blocks: List[Block] = []
        self._partition()
        self._meta = {name: self._get(name) for name in self.params}

    # -- structure ---------------------------------------------------------------------------
    def _check_supported(self) -> None:
        cfg = self.config
        for attr in ("final_logit_softcapping", "logits_scaling", "logit_scale"):
            val = getattr(cfg, attr, None)
            if val not in (None, 1, 1.0):
                raise UnsupportedModelError(f"{type(self.model).__name__}: {attr}={val} changes the logits outside the blocks; fuyou does not support it yet")
        if getattr(cfg, "is_encoder_decoder", False):
            raise UnsupportedModelError("encoder-decoder models are not supported; use a decoder-only causal LM")

    def _find_layers(self) -> nn.ModuleList:
        n = getattr(self.config, "num_hidden_layers", None)
        cands = [m for _, m in self.base.named_children() if isinstance(m, nn.ModuleList) and len(m) == n]
        if len(cands) != 1:
            raise UnsupportedModelError(f"{type(self.model).__name__}: cannot find its list of {n} decoder layers")
        return cands[0]

    def _find_final_norms(self) -> List[nn.Module]:
        skip = {id(self.layers), id(self.embedding)}
        norms = []
        for _, child in self.base.named_children():
            if id(child) in skip or not any(True for _ in child.parameters(recurse=True)):
                continue
            norms.append(child)
        if len(norms) != 1:
            names = [n for n, c in self.base.named_children() if c in norms]
            raise UnsupportedModelError(f"{type(self.model).__name__}: expected one final norm after the layers, found {names or 'none'}")
        return norms

    def _partition(self) -> None:
        owner: Dict[int, str] = {}
        layer_of = {id(p): i for i, layer in enumerate(self.layers) for p in layer.parameters()}
        head_ids = {id(p) for m in self.final_norms for p in m.parameters()}
        head_ids |= {id(p) for p in self.lm_head.parameters()} if self.lm_head is not None else set()
        embed_ids = {id(p) for p in self.embedding.parameters()}
        blocks = {EMBED: Block(EMBED, 0, [])}
        for i in range(len(self.layers)):
            blocks[layer_block_name(i)] = Block(layer_block_name(i), i + 1, [])
        blocks[HEAD] = Block(HEAD, len(self.layers) + 1, [])
        for name, p in self.model.named_parameters(remove_duplicate=False):
            mod_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(mod_name)
            if id(p) in owner:  # a tied parameter seen again
                self.params[owner[id(p)]].refs.append((module, leaf))
                continue
            owner[id(p)] = name
            self.params[name] = ParamInfo(name, tuple(p.shape), [(module, leaf)])
            if id(p) in layer_of:
                blocks[layer_block_name(layer_of[id(p)])].params.append(name)
            elif id(p) in head_ids and id(p) not in embed_ids:
                blocks[HEAD].params.append(name)
            else:
                blocks[EMBED].params.append(name)
        if self.lm_head is not None:
            for p in self.lm_head.parameters():
                if id(p) in embed_ids:
                    blocks[HEAD].borrowed.append((EMBED, owner[id(p)]))
        self.blocks = list(blocks.values())
        self.tied = bool(blocks[HEAD].borrowed)

    def _get(self, name: str) -> nn.Parameter:
        module, leaf = self.params[name].refs[0]
        return module._parameters[leaf]

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def numel(self) -> int:
        return sum(p.numel for p in self.params.values())

    def manifest_blocks(self) -> List[dict]:
        """The block list a store manifest records: each block's parameters with shape and size."""
        return [
            {"name": b.name, "params": [{"name": n, "shape": list(self.params[n].shape), "numel": self.params[n].numel} for n in b.params]}
            for b in self.blocks
        ]

    # -- materialization ---------------------------------------------------------------------
    def attach(self, tensors: Dict[str, torch.Tensor], *, requires_grad: bool) -> Dict[str, nn.Parameter]:
        """Make the named parameters real: each becomes an nn.Parameter over the given tensor."""
        out = {}
        for name, t in tensors.items():
            info = self.params[name]
            p = nn.Parameter(t.view(info.shape), requires_grad=requires_grad)
            for module, leaf in info.refs:
                module._parameters[leaf] = p
            out[name] = p
        return out

    def detach(self, names) -> None:
        """Put the named parameters back on meta (drops every reference to the runtime's buffers)."""
        for name in names:
            meta = self._meta[name]
            for module, leaf in self.params[name].refs:
                module._parameters[leaf] = meta

    def move_buffers(self, device: torch.device) -> None:
        """Buffers (rotary frequencies, masks) to the compute device; parameters stay meta."""
        for module in self.model.modules():
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.device != device:
                    module._buffers[key] = buf.to(device)

    # -- block compute -----------------------------------------------------------------------
    def embed_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """Run everything before the first decoder layer; return (layer-0 input, layer kwargs)."""
        captured = {}

        class _Stop(Exception):
            pass

        def hook(_module, args, kwargs):
            captured["args"] = args
            captured["kwargs"] = kwargs
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise UnsupportedModelError(f"{type(self.model).__name__}: the base model never reached its first decoder layer")
        args, kwargs = captured["args"], dict(captured["kwargs"])
        hidden = args[0] if args else kwargs.pop("hidden_states")
        extra = tuple(args[1:]) if args else ()
        if extra:
            raise UnsupportedModelError(f"{type(self.model).__name__}: decoder layers take extra positional inputs; not supported")
        return hidden, kwargs

    def layer_forward(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.layers[index](hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        for norm in self.final_norms:
            hidden = norm(hidden)
        return self.lm_head(hidden)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of the next-token cross entropy (labels -100 are ignored).

    The step's loss is the sum over micro-batches divided by the step's number of target tokens,
    so accumulation over micro-batches gives exactly the full-batch mean gradient.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())
