"""`cache_tools` command line: build-cache, inspect, verify, convert. `main` returns the exit status (0 = success).

build-cache's options are the `BuildOptions` dataclass parsed by `transformers.HfArgumentParser` (the same style as
`distill.train`); every command runs inside `errors.run_cli` (expected failures: one line, exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING

from cache_tools.format import errors
from cache_tools.format.cli_args import StrictArgumentParser

if TYPE_CHECKING:
    from cache_tools.build_options import BuildOptions

PROG = "cache_tools"


def _parser(command: str = "build-cache") -> argparse.ArgumentParser:
    """The command line (every command's options when `command` is build-cache). Only build-cache needs
    `HfArgumentParser` (its options are a dataclass), and importing transformers costs seconds of CPU: every other
    command, and `cache_tools --help`, is parsed without it."""
    parser = StrictArgumentParser(prog=PROG, description="Build, inspect and verify teacher caches.")
    full = command == "build-cache"
    if full:
        from transformers import HfArgumentParser

        from cache_tools.build_options import BuildOptions, add_build_arguments

        sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
        no_dataclass: dict = {"dataclass_types": []}
    else:
        sub = parser.add_subparsers(dest="command", required=True, parser_class=StrictArgumentParser)
        no_dataclass = {}
    # allow_abbrev=False: a prefix of a flag is refused (with the closest flag), never silently taken for it.
    b = sub.add_parser("build-cache", allow_abbrev=False, **({"dataclass_types": [BuildOptions]} if full else {}),
                       help="run the teacher over a dataset and write the sparse targets cache")
    if full:
        add_build_arguments(b)

    i = sub.add_parser("inspect", allow_abbrev=False, **no_dataclass, help="summarise a cache")
    i.add_argument("cache_dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    v = sub.add_parser("verify", allow_abbrev=False, **no_dataclass,
                       help="check a cache's checksums, layout and numbers")
    v.add_argument("cache_dir")

    c = sub.add_parser("convert", allow_abbrev=False, **no_dataclass,
                       help="rewrite a cache in another target encoding (no teacher); "
                       "rerun to resume")
    c.add_argument("source", metavar="SRC")
    c.add_argument("output", metavar="DST")
    c.add_argument("--encoding", required=True, choices=("fp16", "compact"))
    c.add_argument("--overwrite", action="store_true", help="replace whatever DST holds")
    return parser


def build_options(args: argparse.Namespace) -> BuildOptions:
    """The parsed build-cache namespace as the option dataclass."""
    from cache_tools.build_options import BuildOptions

    return BuildOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildOptions)})


def _build(args: argparse.Namespace) -> int:
    from cache_tools.builder import build_cache

    build_cache(build_options(args))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cache_tools.inspect_cache import cache_summary, format_summary

    summary = cache_summary(args.cache_dir)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(format_summary(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cache_tools.format.verify import format_notes, verify_cache

    faults = verify_cache(args.cache_dir)
    if faults:
        for fault in faults:
            print(f"{PROG} verify: {args.cache_dir}: {fault}", file=sys.stderr)
        return errors.EXIT_BAD_INPUT  # the one exit status of every expected failure
    print(f"{PROG} verify: {args.cache_dir}: OK")
    for note in format_notes(args.cache_dir):
        print(f"{PROG} verify: {args.cache_dir}: note: {note}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from cache_tools.convert import convert_cache

    convert_cache(args.source, args.output, args.encoding, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    handlers = {"build-cache": _build, "inspect": _inspect, "verify": _verify, "convert": _convert}

    def body() -> int:
        args = _parser(command).parse_args(argv)  # inside the boundary: a bad build-cache value is a one-line error
        return handlers[args.command](args)

    return errors.run_cli(f"{PROG} {command}".strip(), body, interrupted_hint="rerun with --resume to continue")
