"""The architecture matrix: every decoder-only entry of transformers' causal-LM auto mapping, built
tiny and random, saved with save_pretrained, fine-tuned 3 steps in fp32 with 2 micro-batches by
fuyou and by plain PyTorch AdamW on the same batches; losses and weights must agree (rtol 1e-5,
atol 1e-6), the export must load in transformers with no missing or unexpected keys, and the
checkpoint's buffers must come back unchanged. Or fuyou refuses the model, with its reason.

    python -m tests.model.matrix                 # run every entry, print the outcomes
    python -m tests.model.matrix --write-docs    # ... and write docs/models.md
    python -m tests.model.matrix llama gpt2      # some entries only

Decoder-only: an entry that is neither an encoder-decoder (seq2seq mapping, is_encoder_decoder),
nor a bidirectional encoder run as a decoder (it has a masked-LM head), nor a multimodal model (its
config holds a text, vision or audio sub-config; its text model has an entry of its own).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

from tests.model.tiny_configs import tiny_config

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "models.md")
STEPS, BATCH, SEQ, MICRO = 3, 4, 16, 2
RTOL, ATOL = 1e-5, 1e-6
MODAL_CONFIGS = {"text_config", "vision_config", "audio_config", "vq_config", "audio_encoder_config"}


@dataclasses.dataclass
class Outcome:
    model_type: str
    architecture: str
    status: str  # "pass" or "refused"
    reason: str = ""
    seconds: float = 0.0


def entries() -> Tuple[List[Tuple[str, str]], List[Tuple[str, str, str]]]:
    """(decoder-only (model_type, class)), (others (model_type, class, why not decoder-only))."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    seq2seq = set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES) | set(getattr(auto, "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", {}))
    decoders, others = [], []
    for model_type, cls in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        config_cls = CONFIG_MAPPING[model_type]
        if model_type in seq2seq or _encoder_decoder(config_cls):
            others.append((model_type, cls, "encoder-decoder"))
        elif model_type in masked:
            others.append((model_type, cls, "bidirectional encoder (has a masked-LM head)"))
        elif set(getattr(config_cls, "sub_configs", {}) or {}) & MODAL_CONFIGS:
            others.append((model_type, cls, "multimodal (text, vision or audio sub-configs)"))
        else:
            decoders.append((model_type, cls))
    return decoders, others


def _encoder_decoder(config_cls) -> bool:
    if set(getattr(config_cls, "sub_configs", {}) or {}) & {"encoder", "decoder", "text_encoder", "audio_encoder"}:
        return True  # an encoder and a decoder configured apart (MusicGen's text encoder and audio decoder)
    try:
        return bool(config_cls().is_encoder_decoder)
    except Exception:  # a config without valid defaults: its class attribute, if any
        return getattr(config_cls, "is_encoder_decoder", False) is True


def run_entry(model_type: str, workdir: str) -> Outcome:
    """Train the entry with fuyou and with PyTorch and compare; AssertionError when fuyou is not exact."""
    from fuyou.model.errors import UnsupportedModelError
    from fuyou.model.source import ModelError
    from tests.helpers import assert_trains_like_pytorch, random_batches, run_fuyou

    t0 = time.perf_counter()
    cfg = tiny_config(model_type)
    ckpt = _save(cfg, os.path.join(workdir, "ckpt"))
    arch = (cfg.architectures or [type(cfg).__name__])[0]
    batches = random_batches(STEPS, BATCH, SEQ, min(cfg.vocab_size, 128), seed=1)
    try:
        rt, results = run_fuyou(ckpt, os.path.join(workdir, "store"), batches, MICRO)
    except (UnsupportedModelError, ModelError) as exc:
        return Outcome(model_type, arch, "refused", str(exc), time.perf_counter() - t0)
    store = os.path.join(workdir, "store")
    ref_model = assert_trains_like_pytorch(store, ckpt, batches, MICRO, results, rtol=RTOL, atol=ATOL)
    check_export(store, ckpt, os.path.join(workdir, "export"), ref_model)
    return Outcome(model_type, arch, "pass", f"attention {rt.ctx.skeleton.attn_implementation}", time.perf_counter() - t0)


def _save(cfg, path: str) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    # Stored buffers get values of their own (a trained router bias is not its init), so a run
    # that ignored them would not match.
    g = torch.Generator().manual_seed(1)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name, buf in model.state_dict().items():
        if name not in params and buf.is_floating_point():
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    cfg.architectures = [type(model).__name__]
    model.save_pretrained(path)
    # Some models reset part of a buffer whenever they load (ZAYA's last balancing bias is -1); the
    # checkpoint gets the values from_pretrained leaves, as a real trained one holds them.
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    reset = {n for n, b in model.state_dict().items() if n not in params and not torch.equal(b, loaded[n])}
    if reset:
        for name in reset:
            model.get_buffer(name).copy_(loaded[name])
        model.save_pretrained(path)
    return path


def check_export(store: str, ckpt: str, out: str, ref_model) -> None:
    """The export loads in transformers with no missing or unexpected keys and holds what
    save_pretrained writes for the reference model after the same training: the same tensor names
    (per-expert tensors as the checkpoint had them), the same values, the checkpoint's buffers
    unchanged."""
    from transformers import AutoModelForCausalLM

    from fuyou.export import export_store

    export_store(store, out)
    _model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], f"export loading info: {info}"
    got = _shards(out)
    ref_model.save_pretrained(out + ".ref")
    want, original = _shards(out + ".ref"), _shards(ckpt)
    assert set(got) == set(want), f"export names differ from save_pretrained's: {sorted(set(got) ^ set(want))[:6]}"
    buffers = {n for n in want if n in original} - {n for n, _ in _checkpoint_params(ref_model)}
    for name, value in got.items():
        if name in buffers:
            torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=lambda m, n=name: f"buffer {n}: {m}")
        else:
            torch.testing.assert_close(value, want[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"exported {n}: {m}")


def _shards(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _checkpoint_params(model):
    """(name, tensor) of the parameters under the names save_pretrained writes them."""
    from fuyou.model.convert import to_checkpoint

    return to_checkpoint(model, {n: p.detach() for n, p in model.named_parameters()}).items()


def documented() -> Dict[str, Tuple[str, str]]:
    """model_type -> (status, reason) as docs/models.md records them."""
    out = {}
    if os.path.isfile(DOCS):
        for line in open(DOCS):
            m = re.match(r"^\| `([^`]+)` \| [^|]+ \| (pass|refused) \| (.*) \|$", line.rstrip("\n"))
            if m:
                out[m.group(1)] = (m.group(2), m.group(3).replace("\\|", "|"))
    return out


def documented_version() -> Optional[str]:
    if os.path.isfile(DOCS):
        m = re.search(r"transformers (\S+)\)", open(DOCS).read())
        return m.group(1) if m else None
    return None


def write_docs(outcomes: List[Outcome], others) -> None:
    import transformers

    passed = [o for o in outcomes if o.status == "pass"]
    refused = [o for o in outcomes if o.status == "refused"]
    lines = [
        "# Models",
        "",
        f"Generated by `python -m tests.model.matrix --write-docs` (transformers {transformers.__version__}); "
        "`tests/model/test_matrix.py` checks every entry against this table.",
        "",
        "Every decoder-only entry of transformers' causal-LM auto mapping, built as a tiny random model "
        f"(`tests/model/tiny_configs.py`), saved with save_pretrained, fine-tuned {STEPS} steps in fp32 with {MICRO} "
        f"micro-batches by fuyou and by plain PyTorch AdamW on the same batches: **pass** = losses and weights "
        f"equal element-wise (rtol {RTOL:g}, atol {ATOL:g}), the checkpoint's buffers come back unchanged, and "
        "the export loads in transformers with no missing or unexpected keys and holds what save_pretrained writes "
        "(per-expert tensors as the checkpoint had them). **refused** = fuyou declines the model with the reason "
        "below before it trains a step (when it builds the model; a model whose layers read state an earlier layer "
        "stored, at its first step).",
        "",
        f"{len(passed)} of {len(outcomes)} pass ({100 * len(passed) / max(len(outcomes), 1):.1f}%), {len(refused)} refused.",
        "",
        "| model type | class | outcome | reason / attention |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| `{o.model_type}` | {o.architecture} | {o.status} | {o.reason.replace('|', chr(92) + '|')} |")
    lines += ["", "Entries of the mapping that are not decoder-only (not in the matrix):", ""]
    lines += [f"- `{mt}` ({cls}): {why}" for mt, cls, why in others]
    with open(DOCS, "w") as f:
        f.write("\n".join(lines) + "\n")


def quiet() -> None:
    """No progress bars or advisory warnings from transformers while the matrix runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("only", nargs="*", help="model types to run (default: all)")
    ap.add_argument("--write-docs", action="store_true", help="write docs/models.md from the outcomes")
    args = ap.parse_args(argv)
    quiet()
    decoders, others = entries()
    outcomes, failed = [], []
    for model_type, _cls in decoders:
        if args.only and model_type not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                o = run_entry(model_type, tmp)
            except Exception as exc:  # not exact, or crashed: neither pass nor refused
                failed.append(model_type)
                print(f"FAIL {model_type}: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}", flush=True)
                continue
        outcomes.append(o)
        print(f"{o.status:7s} {model_type} ({o.seconds:.1f}s): {o.reason}", flush=True)
    if args.write_docs:
        if failed or args.only:
            print("not writing docs/models.md: " + ("entries failed: " + ", ".join(failed) if failed else "run every entry"), file=sys.stderr)
            return 1
        write_docs(outcomes, others)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
