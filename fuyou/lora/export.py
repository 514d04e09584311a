"""`fuyou export --run-dir R`: a LoRA run's committed adapters as a PEFT adapter directory, or with
--merge a full Hugging Face checkpoint of its base with the adapters merged in (W + B·A · scaling,
as peft's merge_and_unload computes it). Both made beside their name and renamed when complete."""
from __future__ import annotations

import math
import os
import shutil
import tempfile

import torch

from ..config import PeftConfig
from ..export import write_checkpoint
from ..optim.state import StateCodecs
from ..store.lock import StoreLock
from ..store.store import open_store
from . import run as run_dir
from .adapters import PEFT_PREFIX, lora_config


def _settings(manifest: dict) -> PeftConfig:
    s = manifest["train"]["run"]["settings"]
    return PeftConfig(method="lora", r=s["peft.r"], alpha=s["peft.alpha"], dropout=s["peft.dropout"], rslora=s["peft.rslora"])


def export_run(root: str, out: str, dtype: str = "fp32", *, merge: bool = False) -> str:
    root, out = os.path.abspath(root), os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"export target {out} exists and is not an empty directory; choose a new directory")
    with StoreLock(root):
        manifest = run_dir.read(root)
        adapters = {k: v for k, v in run_dir.load_state(root, manifest).items() if "::" not in k}
        settings = _settings(manifest)
        if merge:
            with StoreLock(manifest["base"]["store"], shared=True):
                base = open_store(manifest["base"]["store"], StateCodecs.from_json)
                return write_checkpoint(base, out, dtype, deltas=merged_deltas(adapters, settings))
        return _write_adapter(adapters, settings, manifest["base"]["store"], out, dtype)


def merged_deltas(adapters: dict, settings: PeftConfig) -> dict:
    """Base parameter name -> B·A·scaling of its adapter (fp32)."""
    scaling = settings.alpha / (math.sqrt(settings.r) if settings.rslora else settings.r)
    out = {}
    for key, a in adapters.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PEFT_PREFIX): -len(".lora_A.weight")]
            b = adapters[f"{PEFT_PREFIX}{module}.lora_B.weight"]
            out[f"{module}.weight"] = (b.float() @ a.float()) * scaling
    return out


def _write_adapter(adapters: dict, settings: PeftConfig, base: str, out: str, dtype: str) -> str:
    from safetensors.torch import save_file

    # The adapter's targets, as the tensors name them (whatever rule chose them).
    targets = sorted({k.split(".")[-3] for k in adapters if k.endswith(".lora_A.weight")})
    config = lora_config(PeftConfig(method="lora", r=settings.r, alpha=settings.alpha, dropout=settings.dropout, rslora=settings.rslora,
                                    target_modules=",".join(targets)), base)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
    try:
        config.save_pretrained(tmp)
        cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        save_file({k: v.to(cast).contiguous() for k, v in adapters.items()}, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
