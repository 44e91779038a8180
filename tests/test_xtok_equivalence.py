"""The vectorised cross-tokenizer targets are BIT-IDENTICAL to the previous implementation (tests/xtok_reference.py,
kept verbatim): every output array (dtype, shape, bytes) and every stat, on the hand-made hard cases, on packed
windows of real text, on adversarial top-k rows, and on the real Qwen3 -> SmolLM2 pair when ../shared exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xtok_reference as ref
from test_xtok_align import CASES, make_sequence, manifest_for
from xtok_fixtures import trained_tokenizer, write_text_cache

from cache_tools.format.reader import TeacherCacheReader
from distill.data.xtok.pipeline import CrossTokenizerTargets
from distill.data.xtok.topk_map import TopKMapper, map_topk

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
QWEN, SMOL = SHARED / "tokenizers" / "qwen3", SHARED / "tokenizers" / "smollm2"
TEXT = SHARED / "data" / "tinyshakespeare.txt"


def assert_identical(got: dict, want: dict) -> None:
    for key, value in want.items():
        if key == "stats":
            assert got["stats"] == value
            continue
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


def assert_same_mapping(got, want) -> None:
    for key in ("ids", "logprobs", "tail"):
        a, b = getattr(got, key), getattr(want, key)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
    assert (got.teacher_mass, got.mapped_mass, got.exact_mass) == (want.teacher_mass, want.mapped_mass,
                                                                  want.exact_mass)


@pytest.fixture(scope="module")
def digit_tokenizer(corpus):
    return trained_tokenizer(corpus, 400, split_digits=True)


def test_hand_made_cases_match_the_reference(tokenizer, digit_tokenizer, tmp_path):
    for top_k in (1, 4, 16):
        builder = CrossTokenizerTargets(manifest_for(tokenizer, top_k), tokenizer, digit_tokenizer,
                                        cache_dir=tmp_path, max_length=0)
        for i, case in enumerate(sorted(CASES)):
            seq = make_sequence(tokenizer, [CASES[case], "second doc " + CASES[case][:12]], top_k=top_k, seed=i)
            assert_identical(builder(seq), ref.reference_targets(builder, seq))


def test_packed_windows_match_the_reference(tmp_path, tokenizer, digit_tokenizer, corpus):
    # A small teacher vocabulary against K = 64: many teacher ids share a student id (merges in every row).
    reader = TeacherCacheReader(write_text_cache(tmp_path, tokenizer, corpus[:80], max_length=128, top_k=64,
                                                 max_sequences=40))
    for rule in ("first_token", "tail"):
        builder = CrossTokenizerTargets(reader, tokenizer, digit_tokenizer, rule=rule, max_length=0)
        for i in range(len(reader)):
            seq = reader[i]
            assert_identical(builder(seq), ref.reference_targets(builder, seq))


def test_adversarial_rows_match_the_reference():
    """Big merge groups (> 8 members: pairwise summation), exact ties, unsorted rows, unmapped ids, ids past the
    table (padded head rows), rows with nothing mapped, and an empty window."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        V, S = int(rng.integers(5, 400)), int(rng.integers(1, 60))
        k = int(rng.integers(1, min(V, 70)))
        m = int(rng.integers(0, 40))
        map_ids = rng.integers(-1, S, size=V)
        if trial % 7 == 0:
            map_ids[:] = -1
        exact = rng.random(V) < 0.5
        ids = np.stack([rng.permutation(V + 3)[:k] for _ in range(m)]) if m else np.zeros((0, k), np.int64)
        levels = rng.choice([-0.5, -1.0, -2.0, -3.0, -8.0], size=(m, k)) if trial % 2 else rng.normal(-4, 2, (m, k))
        lp = np.minimum(levels, 0).astype(np.float16 if trial % 3 else np.float32)
        if trial % 5 == 0:
            lp = -np.sort(-lp, axis=1)  # sorted like a real top-k
        tail = np.log(rng.uniform(0.01, 0.5, size=m)).astype(np.float32)
        got = TopKMapper(map_ids, exact)(ids.astype(np.int64), lp, tail)
        assert_same_mapping(got, ref.map_topk(ids.astype(np.int64), lp, tail, map_ids, exact))
        assert_same_mapping(map_topk(ids.astype(np.int64), lp, tail, map_ids, exact), got)


@pytest.mark.skipif(not (QWEN.is_dir() and SMOL.is_dir() and TEXT.is_file()),
                    reason="../shared/{tokenizers/qwen3,tokenizers/smollm2,data/tinyshakespeare.txt} absent")
def test_real_tokenizers_match_the_reference(tmp_path):
    from transformers import AutoTokenizer

    qwen, smol = AutoTokenizer.from_pretrained(str(QWEN)), AutoTokenizer.from_pretrained(str(SMOL))
    docs = [d for d in TEXT.read_text(encoding="utf-8").split("\n\n") if d.strip()][:400]
    reader = TeacherCacheReader(write_text_cache(tmp_path, qwen, docs, max_length=256, top_k=32, max_sequences=24,
                                                 name_or_path=str(QWEN)))
    builder = CrossTokenizerTargets(reader, qwen, smol, max_length=0)
    for i in range(len(reader)):
        seq = reader[i]
        assert_identical(builder(seq), ref.reference_targets(builder, seq))
