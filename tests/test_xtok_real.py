"""Real tokenizer pair (Qwen3 teacher -> SmolLM2 student) from ../shared/tokenizers when present: coverage numbers
are recorded (printed and attached as junit properties). Skipped where the folder is absent; the product never
needs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from xtok_fixtures import write_text_cache

from distill.data.xtok.coverage import coverage_report, format_coverage

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
QWEN = SHARED / "tokenizers" / "qwen3"
SMOL = SHARED / "tokenizers" / "smollm2"


@pytest.mark.skipif(not (QWEN.is_dir() and SMOL.is_dir()), reason="../shared/tokenizers/{qwen3,smollm2} absent")
def test_qwen3_to_smollm2_coverage(tmp_path, corpus, record_property):
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(str(QWEN))
    smol = AutoTokenizer.from_pretrained(str(SMOL))
    assert len(qwen) == 151_669 and len(smol) == 49_152
    cache = write_text_cache(tmp_path / "cache", qwen, corpus[:120], max_length=256, top_k=32,
                             name_or_path=str(QWEN))
    report = coverage_report(cache, str(SMOL), max_sequences=60)
    print("\n" + format_coverage(report))
    for key in ("aligned_fraction", "mapped_mass_fraction", "exact_mass_fraction", "exact_teacher_tokens",
                "exact_student_tokens", "mapped_teacher_tokens"):
        record_property(key, report[key])
    assert report["skipped_windows"] == 0
    assert 0.8 < report["aligned_fraction"] < 1.0
    assert report["exact_teacher_tokens"] > 30_000 and report["mapped_mass_fraction"] > 0.99
    assert (cache / "vocab_maps").is_dir()
