"""Command-line parsing shared by every entry point (teacher and student side).

argparse accepts any unambiguous prefix of a flag (`--learning_rat` for `--learning_rate`): a silent guess that
turns a typo into a run with settings nobody asked for. Every parser here refuses prefixes (`allow_abbrev=False`)
and refuses an unknown flag in one line that names the closest real flag."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from cache_tools.format.errors import EXIT_BAD_INPUT, UsageError, UserError, print_error


def option_strings(parser: argparse.ArgumentParser, parsed: argparse.Namespace | None = None) -> list[str]:
    """Every `--flag` spelling `parser` accepts, with those of the sub-command `parsed` chose (of every sub-command
    when none was chosen)."""
    found: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of its options
        found += [s for s in action.option_strings if s.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            chosen = getattr(parsed, action.dest, None) if action.dest != argparse.SUPPRESS else None
            for name, sub in action.choices.items():
                if chosen in (None, name):
                    found += option_strings(sub)
    return found


def with_suggestions(names: Sequence[str], known: Iterable[str]) -> str:
    """`names` joined by ", ", each followed by "(did you mean X?)" when a known name is close to it."""
    known = sorted(set(known))
    parts = []
    for name in names:
        # A cut-off flag (what argparse's prefix matching would take) first, then the closest spelling.
        close = [k for k in known if k.startswith(name)][:1] or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return ", ".join(parts)


def unknown_options_message(unknown: Sequence[str], known: Iterable[str], help_command: str) -> str:
    """One line for command-line words nobody defined: each flag with its closest real spelling, then where to
    look."""
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(unknown)}; see `{help_command}`"
    return f"unknown option(s) {with_suggestions(flags, known)}; see `{help_command}`"


class StrictArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` without prefix matching whose errors are one-line `UsageError`s (the caller's
    `run_cli` prints them and exits 2): unknown flags name the closest real one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        try:
            parsed, unknown = self.parse_known_args(argv, namespace)
        except UserError:
            # A mistyped flag also leaves its real one missing ("required: --teacher"): name the typo first.
            first_word = next((a for a in argv if not a.startswith("-")), None)
            chosen = argparse.Namespace(command=first_word if self._subparsers is not None else None)  # noqa: SLF001
            known = set(option_strings(self, chosen))
            unknown = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
            if not unknown:
                raise
            parsed = chosen
        if unknown:
            command = getattr(parsed, "command", None)  # the sub-command chosen, when this parser has them
            help_command = f"{self.prog} {command} --help" if isinstance(command, str) else f"{self.prog} --help"
            raise UsageError(unknown_options_message(unknown, option_strings(self, parsed), help_command)) from None
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"invalid command line: {message}; see `{self.prog} --help`")


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)` for a command that parses outside `run_cli`: a UsageError is printed as one line
    and the process exits 2."""
    try:
        return parser.parse_args(argv)
    except UsageError as err:
        print_error(parser.prog, str(err))
        raise SystemExit(EXIT_BAD_INPUT) from None
