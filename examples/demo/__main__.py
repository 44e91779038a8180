"""`python -m examples.demo [--out DIR] [--text-file F | --dataset SPEC] [--quick]`: the whole pipeline, offline, on
real text, through the project's real entry points, ending in a report that compares a distilled student with the
same student trained without the teacher.

Stages (one status line each; every subprocess's output goes to OUT/logs/<stage>.log):
  1. text: stdlib docstrings (or yours), every 20th document held out for evaluation
  2. tokenizer: byte-level BPE trained locally on the training documents (shared by teacher and student; with
     --student-vocab-size N the student gets its own, smaller tokenizer and learns through the cross-tokenizer path)
  3. teacher: a few-million-parameter Qwen3-MoE pretrained LM-only by `python -m distill.train --dataset ...`
  4. caches: `cache_tools build-cache` with that teacher: top-256 (compact encoding) and sampled N=64 (RS-KD), for
     the training text and the held-out text (eval curves); the four builds run side by side, one thread each
  5. KD student: `accelerate launch --config_file launch/accelerate/cpu.yaml -m distill.train --cache ...`
  6. RS-KD student: the same command on the sampled cache
  7. LM-only student: the same command, same steps/seed/data, with --kd_weight 0 (5-7 train side by side, one
     thread each)
  8. evaluation on the held-out text -> OUT/report.md, OUT/report.json; TensorBoard runs in OUT/runs/

CPU kernels and threads are pinned (see `reproducible_cpu_env`; the teacher uses min(2, free cores) threads, the
builds and students one each) so a rerun takes the same code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line
from cache_tools.format.errors import UserError
from examples.demo.common import QUICK, DemoError, DemoSettings, reproducible_cpu_env

# Before torch loads (ATen reads ATEN_CPU_CAPABILITY once): this process evaluates models itself.
os.environ.update(reproducible_cpu_env())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = StrictArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--text-file", help="your own text (.txt: one document per line, or .jsonl with a text field)")
    src.add_argument("--dataset", help="a dataset spec as build-cache takes it (local file/folder or hub name)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for CI (the pipeline, not the result)")
    parser.add_argument("--overwrite", action="store_true", help="delete a non-empty --out first")
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="train the teacher even when one trained from the same inputs is kept "
                             "($DISTILL_DEMO_CACHE, default ~/.cache/distill-demo/teachers)")
    for f in dataclasses.fields(DemoSettings):
        if f.name in ("max_docs",):
            parser.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
            continue
        kind = type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            help=f"(default {f.default}; --quick: {QUICK.get(f.name, f.default)})")
    return parse_command_line(parser, argv)


def settings_from(args: argparse.Namespace) -> DemoSettings:
    s = DemoSettings(**(QUICK if args.quick else {}))
    for f in dataclasses.fields(DemoSettings):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(s, f.name, value)
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Progress bars of the demo's own data loading would bury the status lines (tools log theirs to OUT/logs).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from examples.demo.pipeline import run_pipeline

        report = run_pipeline(args, settings_from(args))
    except (DemoError, UserError, ValueError) as err:  # UserError: a tool's one-line refusal, raised in-process
        print(f"demo: {err}", file=sys.stderr)
        return 1
    print(f"[demo] report: {report}")
    print(report.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
