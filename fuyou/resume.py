"""A run is its store: the settings that shape the training, as the manifest records them, and what
`fuyou finetune --resume` may change.

At import the store records every setting of the run (`record`): the model, the data and a
fingerprint of its content, the tokenizer's fingerprint, the batch, the seed, the optimizer and its
schedule, clipping, the codecs, the disk mode, the low-precision recipe; and the settings that may
change mid-run (CHANGEABLE: the target step, budgets, device, I/O backend, checksums, tracing).
`--resume` needs only `--store`: `resumed` restores every recorded setting; a setting the command
line gives that differs from the record is refused, naming the flag and both values, unless it is
changeable (then it is taken, and recorded at the next commit).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from functools import lru_cache
from typing import Dict, Iterable, Optional, Set

from .config import BUILTIN_DATA, SECTION, FinetuneConfig, flag_of

RECORD_VERSION = 1
# Settings that are not the run's: where its store is and what this command does with it.
NOT_RECORDED = ("store", "resume", "overwrite", "data_changed_ok", "peft.run_dir")
# Settings a resumed run may change: they do not shape the trained weights (`steps` says how far to
# go; a decaying schedule then follows the new length).
CHANGEABLE = ("steps", "device", "io_backend", "verify_reads", "trace_dir", "memory.", "eval.data", "eval.every", "output.")


def flat_settings(cfg, prefix: str = "") -> dict:
    """{"batch.seq_len": 128, ...}: every field of a config and of its nested sections, by dotted path."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if SECTION in f.metadata:
            out.update(flat_settings(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def with_settings(cfg, values: dict):
    """`cfg` with the dotted-path settings of `values` replaced (flat_settings' inverse); validated."""
    changes, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = value
    for head, sub in nested.items():
        changes[head] = with_settings(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **changes)


def field_at(cls, path: str) -> dataclasses.Field:
    """The dataclass field at a dotted path of `cls` (sections followed)."""
    head, _, rest = path.partition(".")
    f = next(f for f in dataclasses.fields(cls) if f.name == head)
    return field_at(f.metadata[SECTION], rest) if rest else f


class ResumeError(ValueError):
    """A resumed run asked to change a setting its store records (the message names the fix)."""


def is_changeable(path: str) -> bool:
    return any(path == c or (c.endswith(".") and path.startswith(c)) for c in CHANGEABLE)


@lru_cache(maxsize=16)
def _file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"blake2b-128:{h.hexdigest()}:{size}"


def file_fingerprint(path: str) -> str:
    """A fingerprint of a file's content (blake2b of every byte, and its size); cached per path,
    size and modification time within a process."""
    st = os.stat(path)
    return _file_fingerprint(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def files_fingerprint(directory: str, names: Iterable[str]) -> str:
    """One fingerprint of the files of `names` that exist in `directory` (a tokenizer's files)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(names):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0" + file_fingerprint(path).encode() + b"\0")
    return f"blake2b-128:{h.hexdigest()}"


def record(cfg: FinetuneConfig, *, data_fingerprint: str, tokenizer_fingerprint: str) -> dict:
    """The run's settings as the manifest keeps them (JSON)."""
    settings = {path: value for path, value in flat_settings(cfg).items() if path not in NOT_RECORDED}
    return {"version": RECORD_VERSION, "settings": settings, "data_fingerprint": data_fingerprint, "tokenizer_fingerprint": tokenizer_fingerprint}


def _shown(path: str, value) -> str:
    return "none" if value is None else (BUILTIN_DATA if path == "data" and value == BUILTIN_DATA else str(value))


def given_settings(cfg: FinetuneConfig, given: Optional[Set[str]]) -> Set[str]:
    """The settings a resumed run was asked for: those the command line names, or for a library call
    (None) every setting that differs from its default."""
    if given is not None:
        return set(given)
    defaults = flat_settings(FinetuneConfig())
    return {p for p, v in flat_settings(cfg).items() if v != defaults.get(p)}


def resumed(cfg: FinetuneConfig, stored: dict, given: Set[str], store: str, same: Set[str] = frozenset()) -> FinetuneConfig:
    """`cfg` with every recorded setting of the run restored, but the `given` ones (given_settings):
    a given setting that differs from the record is refused unless it is changeable or in `same`
    (given settings known to mean the run's own although spelled differently: a moved data file
    or model directory with the same content), then taken and recorded at the next commit."""
    settings = stored.get("settings")
    if not isinstance(settings, dict):
        raise ResumeError(f"store {store} records no run settings (made by an older fuyou); start a new run with --overwrite, or another --store")
    ours = flat_settings(cfg)
    restored: Dict[str, object] = {}
    for path, value in settings.items():
        if path not in ours:
            continue  # a setting this fuyou no longer has
        if path in given and ours[path] != value and not is_changeable(path) and path not in same:
            flag = flag_of(field_at(FinetuneConfig, path))
            raise ResumeError(
                f"{flag} {_shown(path, ours[path])} differs from the run in {store} ({flag} {_shown(path, value)}); drop {flag} to resume "
                "with the run's setting, or start a new run (--overwrite, or another --store)"
            )
        if path not in given:
            restored[path] = value
    return with_settings(cfg, restored)
