"""A Hugging Face causal LM as a weightless skeleton, cut into blocks.

The model is built with every parameter on the meta device (buffers such as rotary frequencies are
real: they are small and computed from the config; buffers a checkpoint stores are loaded into it).
Blocks: the embed block (everything the forward does before the first decoder layer), each decoder
layer, and the head (everything after the last layer), as `split.learn_split` finds them by
running the model's own forward. A parameter both parts read (a tied LM head) belongs to the embed
block; the head block borrows it.

Parameters are materialized per block by `attach` (views of a buffer the runtime owns) and put back
on meta by `detach`: the skeleton itself never holds weights.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import UnsupportedModelError
from .learn import learn_split
from .safetensors_io import read_header, read_tensors
from .split import LayerInputs, Split, embed_run, head_run, shared_containers, stored_call

EMBED = "embed"
HEAD = "head"
BUFFERS_FILE = "buffers.safetensors"  # in the store's model directory: the buffers a checkpoint stores


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

    def __init__(self, hf_config, *, attn_implementation: Optional[str] = None, linear: Optional[str] = None):
        self.config = hf_config
        model = _build(hf_config, attn_implementation)
        model.eval()  # dropout off: the backward recomputes each block and must see the same forward
        if linear is not None:
            from ..kernels import convert_to_low_precision

            # Same Parameter objects under the same names: the partition and the store are unchanged.
            convert_to_low_precision(model, linear)
        self.model = model
        # What transformers chose (sdpa where the model supports it, else eager): the reference a
        # run is compared with builds the model the same way.
        self.attn_implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        self.layers = self._find_layers()
        self.params: Dict[str, ParamInfo] = {}
        self.blocks: List[Block] = []
        try:
            self._partition()
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{type(model).__name__} cannot be cut into layer-wise blocks: {exc}") from None
        self._meta = {name: self._get(name) for name in self.params}
        self.on_grad = None  # called with a parameter's name when autograd accumulates a gradient into it
        text = hf_config.get_text_config()
        self.hidden_width = self.split.hidden_width or text.hidden_size
        inter = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
        self.intermediate_width = max(inter) if isinstance(inter, (list, tuple)) else inter  # per-layer sizes: the widest
        self.buffer_names = _persistent_buffers(model)
        self.block_buffers = self._buffers_by_block()

    # -- structure ---------------------------------------------------------------------------
    def _find_layers(self) -> nn.ModuleList:
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        n = getattr(cfg, "num_hidden_layers", None)
        lists = [m for _, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        # The list of num_hidden_layers modules; if several (per-layer norms beside the layers), or
        # none (a config counting sub-layers), the list holding the most weights. learn_split then
        # checks that the forward runs its entries one after the other.
        cands = [m for m in lists if len(m) == n] or lists
        if not cands:
            raise UnsupportedModelError(f"{type(self.model).__name__} keeps no decoder layers in a ModuleList; fuyou cuts a model at the entries of one")
        return max(cands, key=lambda m: sum(p.numel() for p in m.parameters()))

    def _partition(self) -> None:
        names: Dict[int, str] = {}
        refs: Dict[int, List[Tuple[nn.Module, str]]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            mod_name, _, leaf = name.rpartition(".")
            names.setdefault(id(p), name)
            refs.setdefault(id(p), []).append((self.model.get_submodule(mod_name), leaf))
        layer_of: Dict[int, int] = {}
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                if layer_of.setdefault(id(p), i) != i:
                    raise UnsupportedModelError(f"parameter {names[id(p)]} is shared by decoder layers {layer_of[id(p)]} and {i}")
        self.split: Split = learn_split(self.model, self.layers, names, layer_of)
        blocks = {EMBED: Block(EMBED, 0, [])}
        for i in range(len(self.layers)):
            blocks[layer_block_name(i)] = Block(layer_block_name(i), i + 1, [])
        blocks[HEAD] = Block(HEAD, len(self.layers) + 1, [])
        pre, post = self.split.embed_params, self.split.head_params
        for pid, name in names.items():
            p = refs[pid][0][0]._parameters[refs[pid][0][1]]
            self.params[name] = ParamInfo(name, tuple(p.shape), refs[pid])
            if pid in layer_of:
                blocks[layer_block_name(layer_of[pid])].params.append(name)
            elif pid in post and pid not in pre:
                blocks[HEAD].params.append(name)
            else:  # read before the layers, by both parts (tied), or by neither
                blocks[EMBED].params.append(name)
                if pid in post:
                    blocks[HEAD].borrowed.append((EMBED, name))
        self.blocks = list(blocks.values())
        self.tied = bool(blocks[HEAD].borrowed)

    def _buffers_by_block(self) -> Dict[str, List[str]]:
        """Stored buffers grouped as the import and the export walk the blocks: a layer's own with
        its layer, the rest with the embed block (buffers are not trained; this only places them)."""
        prefix = {i: name + "." for name, m in self.model.named_modules() for i, layer in enumerate(self.layers) if m is layer}
        out: Dict[str, List[str]] = {b.name: [] for b in self.blocks}
        for name in self.buffer_names:
            owner = next((i for i, pre in prefix.items() if name.startswith(pre)), None)
            out[EMBED if owner is None else layer_block_name(owner)].append(name)
        return out

    def _get(self, name: str) -> nn.Parameter:
        module, leaf = self.params[name].refs[0]
        return module._parameters[leaf]

    def layer_module_names(self) -> Dict[str, int]:
        """{module path of decoder layer i: i} (e.g. "model.layers.3": 3)."""
        return {name: i for name, m in self.model.named_modules() for i, layer in enumerate(self.layers) if m is layer}

    def describe(self) -> str:
        """One line for a run's start: the class, its blocks, the attention transformers chose."""
        return (f"model {type(self.model).__name__}: embed, {len(self.layers)} decoder layers, head"
                f"{' (tied to the embedding)' if self.tied else ''}; attention {self.attn_implementation}")

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
            if requires_grad:
                p.register_post_accumulate_grad_hook(self._grad_hook(name))
            for module, leaf in info.refs:
                module._parameters[leaf] = p
            out[name] = p
        return out

    def _grad_hook(self, name: str):
        def hook(_param) -> None:  # a post-accumulate hook returns nothing
            if self.on_grad is not None:
                self.on_grad(name)

        return hook

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

    def buffers(self) -> Dict[str, torch.Tensor]:
        """The buffers a checkpoint stores (persistent ones), by state-dict name."""
        return {name: self.model.get_buffer(name) for name in self.buffer_names}

    def load_stored_buffers(self, model_dir: str) -> None:
        """Load the buffers the import stored beside the config (none for a model without any)."""
        path = os.path.join(model_dir, BUFFERS_FILE)
        if os.path.isfile(path):
            header, offset = read_header(path)
            self.load_buffers(read_tensors(path, list(header), header, offset))

    def load_buffers(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Put stored buffer values into the model, each in the dtype the model keeps it in."""
        for name, value in tensors.items():
            mod_name, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(mod_name)
            old = module._buffers[leaf]
            module._buffers[leaf] = value.to(device=old.device, dtype=old.dtype).reshape(old.shape)

    # -- block compute -----------------------------------------------------------------------
    def embed_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, LayerInputs]:
        """Run everything before the first decoder layer; return (layer-0 input, every layer's other inputs)."""
        return embed_run(self.model, self.layers, self.split, input_ids, attention_mask)

    def layer_forward(self, index: int, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Decoder layer `index` on `hidden`; what it hands on to later layers goes into `inputs`."""
        out, extra, _stored = self.layer_call(index, hidden, inputs, carry=True)
        self.carry(index, extra, inputs)
        return out

    def layer_call(self, index: int, hidden: torch.Tensor, inputs: LayerInputs, replace: Optional[dict] = None, *, carry: bool = False):
        """(hidden state out, the whole output tuple or (), what it stored for later layers) of decoder
        layer `index`. `replace`: inputs by key (a stored entry by (container key, entry)) to use
        instead of the recorded ones: leaves the backward takes gradients of. `carry`: leave what it
        stores in the shared containers (the forward); else they are put back as they were."""
        replace = replace or {}
        args, kwargs = inputs.call(index, hidden, {k: v for k, v in replace.items() if not isinstance(k, tuple)})
        read = {k: v for k, v in replace.items() if isinstance(k, tuple)}
        shared = shared_containers(inputs.calls[index])
        out, stored = stored_call(lambda: self.layers[index](*args, **kwargs), shared, read, inputs, index, carry)
        if not isinstance(out, (tuple, list)):
            return out, (), stored
        for pos in self.split.forwarded:
            if pos < len(out) and out[pos] is not None:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__}: decoder layer {index} returns a value besides the hidden state (output {pos}) that the model "
                    "hands to later layers in a way fuyou cannot follow"
                )
        return out[0], tuple(out), stored

    def carry(self, index: int, extra: tuple, inputs: LayerInputs) -> None:
        """Hand layer `index`'s outputs on to the layers the model gives them to (detached: a
        backward that needs their gradient takes it from the later layer's input leaf)."""
        for src, pos, dst, key in self.split.carries:
            if src == index and extra:
                value = extra[pos]
                inputs.set(dst, key, value.detach() if isinstance(value, torch.Tensor) else value)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output: the model's own forward after the layers.
        The embed block's parameters it does not read are absent (meta); placeholders of no memory
        (one zero broadcast to the shape) stand in for them while the forward passes through."""
        absent = [n for n in self.blocks[0].params if self._get(n).device.type == "meta"]
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        self.attach({n: zero.expand(self.params[n].shape) for n in absent}, requires_grad=False)
        try:
            return head_run(self.model, self.layers, self.split, hidden)
        finally:
            self.detach(absent)


def _build(hf_config, attn_implementation: Optional[str]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    arch = (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]
    if getattr(hf_config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{arch} is an encoder-decoder model; fuyou trains decoder-only causal LMs")
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        with _params_on_meta():
            return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, **kw)
    except (ValueError, TypeError, KeyError, NotImplementedError, AttributeError) as exc:
        raise UnsupportedModelError(f"transformers cannot build {arch} as a causal LM from its config ({type(exc).__name__}: {exc}); check config.json") from None


def _persistent_buffers(model: nn.Module) -> List[str]:
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in model.state_dict() if name not in params]


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
