"""Where a model comes from: a local Hugging Face directory (config.json + safetensors) or a preset.

Never unpickles: a checkpoint with only .bin/.pt weights is refused. Weights are read tensor by
tensor with plain reads (no memory map), so importing never holds the whole model in RAM; the names
and layouts a checkpoint stores them in are mapped to the model's by transformers' own conversion
mapping (`convert.py`).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Optional

import torch

from ..data.tokenizer import DEFAULT_TOKENIZER_DIR
from .convert import LoadPlan
from .errors import ModelError
from .safetensors_io import SafetensorsError, read_header, read_tensors

# Presets: Llama-shaped configs built in code (no download). "tiny" is the default job's model.
PRESETS: Dict[str, dict] = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "llama-220m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
DEFAULT_PRESET = "llama-tiny"


def preset_config(name: str, vocab_size: Optional[int] = None):
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} or pass a model directory")
    kw = dict(PRESETS[name])
    if "vocab_size" not in kw:
        kw["vocab_size"] = vocab_size or 4096
    kw.setdefault("max_position_embeddings", 4096)
    cfg = LlamaConfig(**kw, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


class ModelSource:
    """A resolved model: its HF config, where its weights come from, and its tokenizer directory."""

    def __init__(self, spec: str):
        self.spec = spec
        self.preset: Optional[str] = None
        self.weight_files: list = []
        self.index: Dict[str, str] = {}  # tensor name -> safetensors file
        self._headers: Dict[str, tuple] = {}  # safetensors file -> (header, data offset)
        if spec in PRESETS:
            self._init_preset(spec)
        else:
            self._init_dir(spec)

    @classmethod
    def from_config(cls, config, name: str) -> "ModelSource":
        """A model of `config`'s shape with its architecture's own random initialisation, as a
        preset has (no weights are read); `name` describes it."""
        src = cls.__new__(cls)
        src.spec, src.preset, src.weight_files, src.index, src._headers = name, name, [], {}, {}
        src.tokenizer_dir, src.config, src.path = DEFAULT_TOKENIZER_DIR, config, None
        return src

    def _init_preset(self, name: str) -> None:
        from transformers import AutoTokenizer

        self.preset = name
        # Every preset trains on the bundled tokenizer's ids (its vocabulary fits all of them); the
        # small presets size their embedding to it.
        self.tokenizer_dir = DEFAULT_TOKENIZER_DIR
        vocab = len(AutoTokenizer.from_pretrained(self.tokenizer_dir)) if "vocab_size" not in PRESETS[name] else None
        self.config = preset_config(name, vocab)
        self.path = None

    def _init_dir(self, path: str) -> None:
        from transformers import AutoConfig

        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise ModelError(f"model {path} does not exist; pass a Hugging Face model directory or a preset ({', '.join(PRESETS)})")
        if not os.path.isdir(path):
            raise ModelError(f"model {path} is not a directory; pass the directory holding config.json and *.safetensors")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelError(f"model directory {path} is not readable; fix its permissions")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"{path} has no config.json; pass a Hugging Face model directory (save_pretrained output)")
        try:
            self.config = AutoConfig.from_pretrained(path)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}/config.json cannot be read as a transformers config ({exc}); check the file") from None
        self.path = path
        self.tokenizer_dir = path
        self._find_weights(path)

    def _find_weights(self, path: str) -> None:
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map", {})
            for name, fname in weight_map.items():
                if os.path.isabs(fname) or ".." in fname.split("/"):
                    raise ModelError(f"{index_path} points outside the model directory ({fname!r}); refusing it")
                self.index[name] = os.path.join(path, fname)
            self.weight_files = sorted(set(self.index.values()))
            missing = [f for f in self.weight_files if not os.path.isfile(f)]
            if missing:
                raise ModelError(f"{index_path} names {os.path.basename(missing[0])}, which is missing; re-download the checkpoint")
            return
        self.weight_files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not self.weight_files:
            pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt")) + glob.glob(os.path.join(path, "*.pth"))
            if pickled:
                raise ModelError(
                    f"{path} holds only pickled weights ({os.path.basename(pickled[0])}); fuyou never unpickles. "
                    "Convert it once with save_pretrained(..., safe_serialization=True)"
                )
            raise ModelError(f"{path} has no *.safetensors weights; pass a directory saved with save_pretrained")
        for fpath in self.weight_files:
            for name in self._header(fpath)[0]:
                self.index[name] = fpath

    def _header(self, fpath: str) -> tuple:
        if fpath not in self._headers:
            try:
                self._headers[fpath] = read_header(fpath)
            except (SafetensorsError, OSError) as exc:
                raise ModelError(f"{fpath} is not a readable safetensors file ({exc}); re-save or re-download the checkpoint") from None
        return self._headers[fpath]

    def describe(self) -> str:
        return f"preset {self.preset}" if self.preset else self.path

    def bind(self, model) -> None:
        """Plan how the model's tensors come out of the checkpoint: transformers' own key renamings
        and fusions (e.g. per-expert tensors -> one tensor per layer), as from_pretrained applies them."""
        self.arch = type(model).__name__
        self.plan = LoadPlan(model, self.index)

    def block_tensors(self, names) -> Dict[str, torch.Tensor]:
        """{name: tensor} for the named model tensors, reading only the checkpoint tensors they come from."""
        got = self.plan.produce(names, self._read)
        state = self.plan.state
        for n in names:
            if n not in got:
                raise ModelError(
                    f"checkpoint {self.path} has no tensor for {n!r}, even through transformers' key mapping of {self.arch}; "
                    "it does not match its config.json"
                )
            if tuple(got[n].shape) != tuple(state[n].shape):
                raise ModelError(f"checkpoint {self.path}: {n!r} has shape {tuple(got[n].shape)}, the config says {tuple(state[n].shape)}; it does not match its config.json")
        return {n: got[n] for n in names}

    def _read(self, key: str) -> torch.Tensor:
        fpath = self.index[key]
        header, offset = self._header(fpath)
        try:
            return read_tensors(fpath, [key], header, offset)[key]
        except (SafetensorsError, OSError) as exc:
            raise ModelError(f"{fpath}: cannot read tensor {key!r} ({exc}); re-download the checkpoint") from None
