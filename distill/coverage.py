"""`python -m distill.coverage CACHE --student-tokenizer S [--json]`: how well a teacher cache serves a student with
another tokenizer (aligned positions, mapped teacher mass, exact vocabulary twins), before any GPU hour is spent.

It lives on the student side because it runs the student's cross-tokenizer pipeline; the teacher side
(`cache_tools`) never imports `distill`."""

from __future__ import annotations

import argparse
import json
import sys

from cache_tools.format.cli_args import StrictArgumentParser
from cache_tools.format.errors import run_cli


def parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(prog="python -m distill.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir")
    parser.add_argument("--student-tokenizer", "--student_tokenizer", required=True,
                        help="student tokenizer: hub id or local folder")
    parser.add_argument("--max-sequences", "--max_sequences", type=int, default=200,
                        help="windows sampled evenly over the cache")
    parser.add_argument("--xtok-rule", "--xtok_rule", default="first_token", choices=["first_token", "tail"])
    parser.add_argument("--student-chat-template", "--student_chat_template", default=None,
                        help="conversational caches: the student's chat template FILE (default: its tokenizer's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = parser().parse_args(argv)
        from distill.data.xtok.coverage import coverage_report, format_coverage
        from distill.data.xtok.pipeline import tokenizer_from_flag

        student = tokenizer_from_flag("--student-tokenizer", args.student_tokenizer)
        report = coverage_report(args.cache_dir, student, max_sequences=args.max_sequences, rule=args.xtok_rule,
                                 chat_template=args.student_chat_template)
        print(json.dumps(report, indent=2, sort_keys=True, default=str) if args.json else format_coverage(report))
        return 0

    return run_cli("python -m distill.coverage", body)

if __name__ == "__main__":
    sys.exit(main())
