"""`fuyou finetune --config run.toml`: settings from a file, with the layout of fuyou.config —
top-level keys for the run's own settings, a table per section ([optim], [batch], [memory],
[state], [eval], [output]) — read with the stdlib's tomllib (YAML when the file ends in .yaml/.yml
and PyYAML is installed). A key is a setting's field name or its flag's name (gpu_mem for
--gpu-mem); sizes may be written "4GiB". Flags on the command line override the file.
`--print-config` writes the effective settings in the same layout."""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, Set

from ..config import CLI, SECTION, format_size, parse_size
from .args import Setting, settings


def load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror}); pass a TOML file") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: YAML needs the pyyaml package (pip install pyyaml), or write the file as TOML") from None
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        import tomllib

        try:
            doc = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--config {path}: not valid TOML ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--config {path}: expected keys and tables at the top level")
    return doc


def _flat(doc: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = value
    return out


def _by_name(cls, root: str) -> Dict[str, Setting]:
    """File key -> setting: its path below `root` by field name, and by its flag's name."""
    out = {}
    for s in settings(cls):
        path = s.dest[len(root):] if s.dest.startswith(root) else s.dest
        section = path.rpartition(".")[0]
        out[path] = s
        out[(section + "." if section else "") + s.flag.lstrip("-").replace("-", "_")] = s
    return out


def _value(s: Setting, value, key: str, path: str):
    if isinstance(value, str) and s.spec.parse is not None:
        try:
            return s.spec.parse(value)
        except ValueError as exc:
            raise ValueError(f"--config {path}: {key}: {exc}") from None
    if s.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, s.kind) or (isinstance(value, bool) and s.kind is not bool):
        raise ValueError(f"--config {path}: {key} = {value!r} is not a {s.kind.__name__}")
    if s.spec.choices and value not in s.spec.choices:
        raise ValueError(f"--config {path}: {key} = {value!r}; choose one of {', '.join(s.spec.choices)}")
    return value


def apply(cls, namespace, path: str, given: Set[str], root: str = "job.") -> Set[str]:
    """Set the file's settings on the parsed `namespace`, but those the command line gives; return
    the settings the file gave."""
    names = _by_name(cls, root)
    from_file = set()
    for key, value in _flat(load(path)).items():
        s = names.get(key)
        if s is None:
            raise ValueError(f"--config {path}: unknown setting {key!r}; the settings are those of --print-config (or `fuyou finetune --help`)")
        from_file.add(s.dest)
        if s.dest not in given:
            setattr(namespace, s.dest, _value(s, value, key, path))
    return from_file


def to_toml(cfg) -> str:
    """A config dataclass as a --config file: its own settings first, then one table per section."""
    top, tables = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if SECTION in f.metadata:
            body = _toml_lines(value)
            if body:
                tables.append(f"\n[{f.name}]\n" + "\n".join(body))
        elif f.name not in ("resume", "overwrite", "data_changed_ok"):
            top += _toml_lines(cfg, only=f.name)
    return "\n".join(top) + "\n" + "".join(t + "\n" for t in tables)


def _toml_lines(cfg, only: str = None) -> list:
    out = []
    for f in dataclasses.fields(cfg):
        if (only is not None and f.name != only) or SECTION in f.metadata:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            out.append(f"# {f.name} is unset")
            continue
        parse = getattr(f.metadata.get(CLI), "parse", None)
        shown = f'"{format_size(value)}"' if parse is parse_size else (json.dumps(value) if isinstance(value, (str, bool)) else repr(value))
        out.append(f"{f.name} = {shown}")
    return out
