"""The `fuyou` command: a parser generated from fuyou.config, then one handler per subcommand; an
expected failure becomes one line `fuyou: error: ...` and exit 2."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .. import __version__
from .commands import ExportCommand, FinetuneCommand, PlanCommand, ProbeCommand, ProfileCommand
from . import config_file, plan, run
from .args import Parser, add_command, build, given_settings

EXIT_USAGE = 2
COMMANDS = {  # subcommand -> (its settings, its handler)
    "finetune": (FinetuneCommand, run.finetune_command),
    "export": (ExportCommand, run.export_command),
    "plan": (PlanCommand, plan.plan_command),
    "probe": (ProbeCommand, plan.probe_command),
    "profile": (ProfileCommand, plan.profile_command),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fuyou", description="Fine-tune models far larger than GPU memory, with the training state on SSD.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {name: add_command(sub, name, cls) for name, (cls, _handler) in COMMANDS.items()}
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # answered with the subcommand's usage: what it does take
        command = parser.commands.get(args.command, parser)
        command.print_usage(sys.stderr)
        print(f"fuyou: error: unrecognized arguments: {' '.join(unknown)}; see `fuyou {args.command or ''} --help`".replace("  ", " "),
              file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from ..dist.group import RankError  # these import torch: not before --help and --version are answered
    from ..store.manifest import StoreError

    cls, handler = COMMANDS[args.command]
    given = given_settings(cls, sys.argv[1:] if argv is None else argv)
    try:
        if getattr(args, "config_file", None):
            given |= config_file.apply(cls, args, args.config_file, given)  # the file's settings count as given
        return handler(build(cls, args), given)
    except KeyboardInterrupt:
        print("fuyou: interrupted; the store keeps its last committed step", file=sys.stderr)
        return 130
    except (ValueError, OSError, StoreError, FloatingPointError, RankError) as exc:
        # Expected failures (bad input, budgets, disk errors): one line naming the fix. Anything
        # else is a bug and keeps its traceback.
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"fuyou: error: {msg}", file=sys.stderr)
        return EXIT_USAGE

