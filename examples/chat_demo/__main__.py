"""`python -m examples.chat_demo [--out DIR] [--quick] [--seeds N]` (or `bash scripts/demo.sh --chat`): conversational
distillation offline, across two tokenizers AND two chat templates, through the project's real command lines.

Stages: (1) conversations built from the Python standard library's docstrings (question about a function, its
docstring as the answer, sometimes a follow-up turn and a system message); (2) a teacher and a student tokenizer,
each with its own chat template; (3) a small dense teacher pretrained LM-only (`distill.train --dataset ...
--packing isolated`) on its rendering of the training conversations; (4) `cache_tools build-cache` on the `messages`
file (teacher template, isolated packing, targets stored on assistant positions only) for training and held-out
conversations; (5) `distill.prepare_xtok` + `distill.coverage`: the student re-renders every conversation with its own
template, KD pairs positions on message content only; (6) for each seed, the KD student and the identical LM-only
student (`--kd_weight 0`, same cache, same assistant-only CE); (7) OUT/report.md: held-out assistant-token CE of both,
paired over seeds, and how many positions carry no stored target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from examples.chat_demo.pipeline import QUICK, ChatSettings, DemoError, clean, run, status
from examples.demo.common import reproducible_cpu_env

# Before torch loads, and inherited by every stage's subprocess: as many threads as cores are free (at most 2) and
# pinned kernels. Unpinned, torch starts one thread per core, and on a busy machine those threads wait on each
# other at every barrier, which made the training stages several times slower.
os.environ.update(reproducible_cpu_env())

GOAL = 3.0  # percent better held-out assistant-token CE than LM-only, paired over seeds


def report(result: dict, out: Path) -> Path:
    kd, lm = result["heldout_assistant_ce"]["kd"], result["heldout_assistant_ce"]["lm_only"]
    gains = [100.0 * (b - a) / b for a, b in zip(kd, lm, strict=True)]
    mean = statistics.fmean(gains)
    sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
    cache, cov, s = result["cache"], result["coverage"], result["settings"]
    lines = [
        "# Chat demo: cross-template, assistant-only distillation", "",
        f"Teacher: Qwen3-shaped template, {s['teacher_vocab']}-token tokenizer. Student: Zephyr-shaped template, "
        f"{s['student_vocab']}-token tokenizer (other pre-tokenisation). Windows of {s['max_length']} teacher tokens, "
        f"top-{s['top_k']} targets, {s['student_steps']} student steps per run.", "",
        "| seed | KD student CE | LM-only CE | KD better by |", "|---:|---:|---:|---:|",
        *[f"| {i} | {a:.4f} | {b:.4f} | {g:+.2f}% |" for i, (a, b, g) in enumerate(zip(kd, lm, gains, strict=True))],
        "",
        f"Held-out assistant-token CE (each student's own tokenizer and template): KD student better by "
        f"**{mean:+.2f}% ± {sd:.2f}** (paired over {len(gains)} seed(s); goal >= {GOAL:.0f}%: "
        f"{'met' if mean >= GOAL else 'NOT met'}).", "",
        f"Targets not stored: {cache['not_stored']} of {cache['positions']} cached positions "
        f"({100 * cache['not_stored'] / max(cache['positions'], 1):.1f}%: prompt and markup positions, whose next "
        "token is not assistant content).",
        f"Cross-template coverage: {100 * cov['assistant_aligned_fraction']:.1f}% of the student's assistant-token "
        f"positions get a KD target ({100 * cov['aligned_fraction']:.1f}% of all its positions; the rest is template "
        "markup, end-of-content positions, or token boundaries the two tokenizers do not share).", "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps({**result, "gain_percent": gains, "gain_mean": mean,
                                                 "gain_sd": sd}, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.chat_demo", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("demo_chat_out"), help="output folder (recreated)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests (the pipeline, not the result)")
    parser.add_argument("--seeds", type=int, default=None, help="student seeds (default 3; --quick: 1)")
    args = parser.parse_args(argv)
    settings = ChatSettings(**QUICK.__dict__) if args.quick else ChatSettings()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        settings.seeds = args.seeds
    out = args.out.resolve()
    try:
        clean(out)
        path = report(run(out, settings), out)
    except DemoError as err:
        print(f"chat demo: {err}", file=sys.stderr)
        return 1
    status(7, 7, "report", str(path))
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
