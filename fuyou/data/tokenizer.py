"""Tokenizers: the model directory's own, or the bundled one of the default job (no download)."""
from __future__ import annotations

import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TOKENIZER_DIR = os.path.join(DATA_DIR, "default_tokenizer")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "default_corpus.jsonl")


class DataError(ValueError):
    """Training data or tokenizer that cannot be used (the message names the fix)."""


def load_tokenizer(path: str):
    """AutoTokenizer from a local directory, offline."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"no usable tokenizer in {path} ({str(exc).splitlines()[0]}); put tokenizer.json there or use a model directory that has one") from None
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in {path} has no end-of-sequence token; set eos_token in its tokenizer_config.json")
    return tok
