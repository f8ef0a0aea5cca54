"""The command line of every `vitkit` verb: one argparse style, and every flag spelled either way
(`--use_ema` as MindCV users type it, `--use-ema` as timm users do). The verbs that take a run config get
one option per config field, generated from the schema (`vitkit.engine.config.add_config_arguments`)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def underscore_flags(argv: Sequence[str]) -> list[str]:
    """`--a-b` / `--a-b=v` -> `--a_b` / `--a_b=v`; values and short options stay as typed."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def at_least(low: float, kind: type = int) -> Any:
    """An argparse `type=` for a number >= `low`: `--topk 0` or `--threads -1` is the parser's usage error at
    once, not a traceback (torch's set_num_threads) or a silently empty answer later."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, not "
                                             f"{text!r}") from None
        if value != value:
            raise argparse.ArgumentTypeError(f"must be a number (got {text})")
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g} (got {text})")
        return value

    parse.__name__ = kind.__name__
    return parse


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, with an action's metavar shown as given when it asks (`--lr FLOAT`, not `[FLOAT ...]`)."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if getattr(action, "plain_metavar", False) and isinstance(action.metavar, str):
            return action.metavar
        return super()._format_args(action, default_metavar)


class VerbParser(argparse.ArgumentParser):
    """`vitkit VERB`'s parser: its module docstring as --help, no abbreviated flags, both flag spellings."""

    def __init__(self, verb: str, doc: str | None, **kwargs: Any):
        super().__init__(prog=f"vitkit {verb}", description=doc, allow_abbrev=False,
                         formatter_class=_Formatter, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        return super().parse_known_args(underscore_flags(sys.argv[1:] if args is None else args), namespace)

    def add_source(self, help: str) -> None:
        """The checkpoint (or model) to use: positional, or `--ckpt_path` as MindCV spells it."""
        self.add_argument("source", nargs="?", help=f"{help} (or --ckpt_path)")
        self.add_argument("--ckpt_path", default=None, help="the checkpoint, instead of the positional SOURCE")

    def parse_with_source(self, argv: Sequence[str], more: str | None = None) -> argparse.Namespace:
        """Parse; with `--ckpt_path`, a positional given is the first of the `more` arguments (predict's images)."""
        args = self.parse_args(argv)
        if args.ckpt_path is not None:
            if args.source is not None and more is None:
                self.error("give the checkpoint once: as SOURCE or as --ckpt_path")
            if args.source is not None:
                setattr(args, more, [args.source, *getattr(args, more)])
            args.source = args.ckpt_path
        if args.source is None:
            self.error("the following arguments are required: source (or --ckpt_path)")
        if more is not None and not getattr(args, more):
            self.error(f"the following arguments are required: {more}")
        return args
