"""Subcommands `fuyou plan`, `fuyou probe` and `fuyou profile` (registered by cli.py)."""
from __future__ import annotations

COMMANDS: dict = {}


def add_subcommands(sub) -> None:
    """Register the planning/profiling subcommands on the `fuyou` parser's subparsers."""
    return None
