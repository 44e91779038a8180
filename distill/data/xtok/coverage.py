"""Coverage of a teacher cache for a student tokenizer, before any GPU hour is spent: how many student positions get
a KD target (aligned), how much teacher top-k mass lands on student ids (mapped, and exactly mapped), and how much of
each vocabulary has an exact twin. `cache_tools inspect DIR --student-tokenizer S` prints `format_coverage`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cache_tools.format.reader import TeacherCacheReader
from distill.data.chat import is_conversational
from distill.data.xtok.pipeline import CrossTokenizerTargets, aggregate_stats
from distill.data.xtok.token_bytes import tokenizer_label


def coverage_report(cache_dir: str | os.PathLike, student_tokenizer: Any, max_sequences: int = 200,
                    rule: str = "first_token", teacher_tokenizer: Any = None,
                  chat_template: str | None = None) -> dict[str, Any]:
    """Run the cross-tokenizer pipeline over the first `max_sequences` windows (evenly spread over the cache when it
    holds more) and summarise. `student_tokenizer`: object or path/hub id."""
    reader = TeacherCacheReader(cache_dir)
    try:
        builder = CrossTokenizerTargets(reader, teacher_tokenizer, student_tokenizer, rule=rule,
                                        assistant_only=is_conversational(reader.manifest),
                                        chat_template=chat_template, use_store=False)
        count = min(len(reader), max_sequences)
        picks = np.unique(np.linspace(0, len(reader) - 1, count).round().astype(np.int64)) if count else []
        stats = [builder(reader[int(i)])["stats"] for i in picks]
    finally:
        reader.close()
    totals = aggregate_stats(stats)
    vmap = builder.vocab_map
    teacher_size = len(builder.teacher_tok)
    student_size = len(builder.student_tok)
    exact_student = np.unique(vmap.ids[:teacher_size][vmap.exact[:teacher_size]])
    return {
        "cache_dir": str(cache_dir),
        "teacher_tokenizer": tokenizer_label(builder.teacher_tok),
        "student_tokenizer": tokenizer_label(builder.student_tok),
        "rule": rule,
        "sequences": len(stats),
        "student_tokens": int(totals["student_tokens"]),
        "aligned_positions": int(totals["aligned"]),
        "aligned_fraction": totals["aligned_fraction"],
        "mapped_mass_fraction": totals["mapped_mass_fraction"],
        "exact_mass_fraction": totals["exact_mass_fraction"],
        "skipped_windows": int(totals["skipped"]),
        "assistant_tokens": int(totals["assistant_tokens"]),
        "assistant_aligned_fraction": totals["assistant_aligned_fraction"],
        "teacher_vocab": teacher_size,
        "student_vocab": student_size,
        "exact_teacher_tokens": int(vmap.exact[:teacher_size].sum()),
        "mapped_teacher_tokens": int((vmap.ids[:teacher_size] >= 0).sum()),
        "exact_student_tokens": int(exact_student.shape[0]),
        "vocab_map": str(builder.map_path) if builder.map_path else None,
    }


def format_coverage(report: dict[str, Any]) -> str:
    """Human-readable lines for `cache_tools inspect`."""
    def pct(x: float) -> str:
        return f"{100.0 * x:.1f}%"

    tv, sv = report["teacher_vocab"], report["student_vocab"]
    lines = [
        f"cross-tokenizer coverage: {report['teacher_tokenizer']} -> {report['student_tokenizer']} "
        f"(rule {report['rule']}, {report['sequences']} windows)",
        f"  aligned positions   {report['aligned_positions']}/{report['student_tokens']} student tokens "
        f"({pct(report['aligned_fraction'])} get a KD target; CE applies to all)",
        f"  mapped top-k mass   {pct(report['mapped_mass_fraction'])} to student ids "
        f"(exact twins {pct(report['exact_mass_fraction'])}, by the rule "
        f"{pct(max(0.0, report['mapped_mass_fraction'] - report['exact_mass_fraction']))}); "
        f"{pct(max(0.0, 1.0 - report['mapped_mass_fraction']))} goes to the tail bucket",
        f"  vocab overlap       {report['exact_teacher_tokens']}/{tv} teacher tokens have an exact student twin "
        f"({pct(report['exact_teacher_tokens'] / tv if tv else 0.0)}); {report['exact_student_tokens']}/{sv} student "
        f"tokens ({pct(report['exact_student_tokens'] / sv if sv else 0.0)})",
        f"  mapped by the rule  {report['mapped_teacher_tokens']}/{tv} teacher tokens",
    ]
    if report.get("assistant_tokens"):
        lines.insert(2, f"  assistant tokens    {pct(report['assistant_aligned_fraction'])} of "
                        f"{report['assistant_tokens']} aligned (KD on content both models consumed; template markup "
                        "gets none)")
    if report["skipped_windows"]:
        lines.append(f"  WARNING: {report['skipped_windows']} windows skipped: cached tokens do not reproduce the "
                     "cached text")
    if report.get("vocab_map"):
        lines.append(f"  vocab map           {report['vocab_map']}")
    return "\n".join(lines)
