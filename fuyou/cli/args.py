"""The `fuyou` command line, generated from the config dataclasses of fuyou.config.

Each field declared with `setting(...)`, nested sections included, becomes one argument in its
help group, with its default as the parser's default and shown once in its help; `build` turns the
parsed arguments back into the dataclass, whose validation then runs as for any other caller.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from typing import Iterator, NamedTuple, Optional

from ..config import CLI, GROUP_NOTES, GROUPS, ONLY, SECTION, Flag, flag_of, format_size, parse_size


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `fuyou: error: ...`, exit 2, as the command's other
    errors. Flags must be spelled out (no abbreviations), so which settings a command line gives
    can be read off it (`given_settings`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"fuyou: error: {message}\n")


class Setting(NamedTuple):
    """One command-line setting of a command's dataclass."""

    dest: str  # its path from the command's dataclass, e.g. "job.memory.gpu_mem_bytes"
    field: dataclasses.Field
    spec: Flag
    kind: type  # the value's type, Optional unwrapped

    @property
    def flag(self) -> str:
        return flag_of(self.field)

    @property
    def is_switch(self) -> bool:
        return self.kind is bool


def settings(cls, prefix: str = "", only=None) -> Iterator[Setting]:
    """The settings of dataclass `cls` and of its nested sections, in declaration order (`only`:
    these fields of `cls`, as its holder's `section(..., only=...)` names them)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if SECTION in f.metadata:
            yield from settings(f.metadata[SECTION], f"{prefix}{f.name}.", f.metadata.get(ONLY))
        elif CLI in f.metadata:
            yield Setting(prefix + f.name, f, f.metadata[CLI], _unwrap_optional(hints[f.name]))


def _unwrap_optional(t) -> type:
    if typing.get_origin(t) is typing.Union:
        (t,) = [a for a in typing.get_args(t) if a is not type(None)]
    return t


def shown_default(s: Setting) -> Optional[str]:
    """The default as --help shows it, or None where there is none worth showing (a switch, a
    required value, or None with nothing said about what it means)."""
    default = s.field.default
    if s.spec.shown is not None:
        return s.spec.shown
    if s.is_switch or default is dataclasses.MISSING or default is None:
        return None
    if s.spec.parse is parse_size:
        return format_size(default)
    return f"{default:g}" if isinstance(default, float) else str(default)


def add_command(subparsers, name: str, cls) -> argparse.ArgumentParser:
    """Register subcommand `name`, whose settings are dataclass `cls`: its docstring's first line is
    the command's summary, the rest its description."""
    summary, _, details = inspect.getdoc(cls).partition("\n")
    parser = subparsers.add_parser(name, help=summary[:1].lower() + summary[1:].rstrip("."), description=details.strip() or summary,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    items = list(settings(cls))
    groups = {title: parser.add_argument_group(title, GROUP_NOTES.get(title)) for title in GROUPS if any(s.spec.group == title for s in items)}
    for s in items:
        _add_argument(groups.get(s.spec.group, parser), s)
    return parser


def _add_argument(group, s: Setting) -> None:
    help_text = s.spec.help if shown_default(s) is None else f"{s.spec.help} (default: {shown_default(s)})"
    kw = {"dest": s.dest, "help": help_text.replace("%", "%%")}
    if s.is_switch:
        if s.field.default and s.spec.flag is None:
            raise TypeError(f"{s.dest}: a switch that defaults to True needs a flag saying what it turns off, e.g. --no-...")
        group.add_argument(s.flag, action="store_false" if s.field.default else "store_true", default=s.field.default, **kw)
        return
    if s.field.default is dataclasses.MISSING:
        kw["required"] = True
    else:
        kw["default"] = s.field.default
    if s.spec.choices:
        kw["choices"] = s.spec.choices  # argparse lists them as the metavar
    else:
        kw["metavar"] = "SIZE" if s.spec.parse is parse_size else s.flag.lstrip("-").replace("-", "_").upper()
    group.add_argument(s.flag, type=_argument_type(s.spec.parse or s.kind), **kw)


def _argument_type(parse):
    """`parse` as an argparse type: its ValueError message becomes the usage error (argparse would
    replace it by 'invalid ... value')."""
    if parse in (int, float, str):
        return parse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def build(cls, namespace: argparse.Namespace, prefix: str = "", only=None):
    """The dataclass `cls` from parsed arguments; fields without a flag (or left out by `only`) keep
    their defaults. Raises the dataclasses' own ValueError for an invalid value or combination."""
    values = {}
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if SECTION in f.metadata:
            values[f.name] = build(f.metadata[SECTION], namespace, f"{prefix}{f.name}.", f.metadata.get(ONLY))
        elif CLI in f.metadata:
            values[f.name] = getattr(namespace, prefix + f.name)
    return cls(**values)


def given_settings(cls, argv) -> set:
    """The dotted paths (as `settings` names them) of the settings `argv` gives explicitly, whatever
    their value: `fuyou finetune --resume` refuses a given setting that differs from the run's."""
    words = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {s.dest for s in settings(cls) if s.flag in words}
