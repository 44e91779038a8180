"""Cross-tokenizer targets: student windows capped at max_length, and sampled (RS-KD) targets mapped through the
same vocabulary map (log(count / N), -1 padding with a placeholder log-prob, tail -inf)."""

from __future__ import annotations

import numpy as np
import pytest
from test_xtok_align import CASES, make_sequence, manifest_for
from xtok_fixtures import sampled_rows, trained_tokenizer, write_text_cache

from cache_tools.format.reader import CachedSequence, TeacherCacheReader
from distill.data.xtok.pipeline import CrossTokenizerTargets
from distill.data.xtok.topk_map import TopKMapper

KEYS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "kd_mask")


@pytest.fixture(scope="module")
def student_tok(corpus):
    return trained_tokenizer(corpus, 400, split_digits=True)


def test_student_windows_are_capped_at_the_cache_window_by_default(tmp_path, tokenizer, student_tok, corpus):
    reader = TeacherCacheReader(write_text_cache(tmp_path, tokenizer, corpus[:40], max_length=64, max_sequences=12))
    full = CrossTokenizerTargets(reader, tokenizer, student_tok, max_length=0)
    capped = CrossTokenizerTargets(reader, tokenizer, student_tok)  # default: manifest.max_length
    short = CrossTokenizerTargets(reader, tokenizer, student_tok, max_length=10)
    assert capped.max_length == 64 and full.max_length is None
    longer = 0
    for i in range(len(reader)):
        whole, cut, tiny = full(reader[i]), capped(reader[i]), short(reader[i])
        n = len(whole["input_ids"])
        longer += n > 64
        assert len(cut["input_ids"]) == min(n, 64) and len(tiny["input_ids"]) == min(n, 10)
        assert cut["stats"]["truncated"] == max(n - 64, 0) and tiny["stats"]["truncated"] == max(n - 10, 0)
        for out in (cut, tiny):  # the kept prefix keeps exactly its targets
            m = len(out["input_ids"])
            for key in KEYS:
                np.testing.assert_array_equal(out[key], whole[key][:m], err_msg=key)
            assert out["stats"]["aligned"] == int(whole["kd_mask"][:m].sum())
    assert longer > 0, "the student tokenizer should split some windows into more than 64 tokens"


def test_sampled_rows_map_without_nan_and_keep_the_tail_empty():
    rng = np.random.default_rng(1)
    V, S, N, K = 300, 40, 64, 24
    map_ids = rng.integers(0, S, size=V)  # everything mapped, many merges
    ids, lp, tail, counts = sampled_rows(rng, 50, V, N, K)
    out = TopKMapper(map_ids, np.zeros(V, bool))(ids, lp, tail)
    assert np.isneginf(out.tail).all() and not np.isnan(out.logprobs).any()
    for row in range(50):  # the student distribution is the teacher's counts summed per student id
        want: dict[int, float] = {}
        for t_id, c in zip(ids[row], counts[row], strict=True):
            if t_id >= 0:
                want[int(map_ids[t_id])] = want.get(int(map_ids[t_id]), 0.0) + c / N
        keep = out.ids[row] >= 0
        got = dict(zip(out.ids[row][keep].tolist(), np.exp(out.logprobs[row][keep].astype(np.float64)).tolist(),
                       strict=True))
        assert got.keys() == want.keys()
        assert all(abs(got[s] - want[s]) < 1e-6 for s in want)
        assert (np.diff(out.logprobs[row][keep]) <= 0).all() and (out.logprobs[row][~keep] == 0).all()
    assert abs(out.mapped_mass - 50.0) < 1e-5 and abs(out.teacher_mass - 50.0) < 1e-5  # padding holds no mass


def test_unmapped_sampled_ids_move_their_mass_into_the_tail():
    rng = np.random.default_rng(2)
    V, N, K = 200, 32, 16
    map_ids = np.where(rng.random(V) < 0.3, -1, rng.integers(0, 50, size=V))
    ids, lp, tail, counts = sampled_rows(rng, 40, V, N, K)
    out = TopKMapper(map_ids, np.zeros(V, bool))(ids, lp, tail)
    lost = np.array([sum(c for t, c in zip(r, cr, strict=True) if t >= 0 and map_ids[t] < 0) / N
                     for r, cr in zip(ids, counts, strict=True)])
    assert not np.isnan(out.tail).any() and not np.isnan(out.logprobs).any()
    assert np.array_equal(np.isneginf(out.tail), lost == 0) and (lost > 0).any()
    np.testing.assert_allclose(np.exp(out.tail[lost > 0]), lost[lost > 0], rtol=1e-6)
    kept = np.where(out.ids >= 0, np.exp(out.logprobs.astype(np.float64)), 0.0).sum(1)
    np.testing.assert_allclose(kept + lost, 1.0, rtol=1e-6)


def test_sampled_window_through_the_pipeline(tokenizer, student_tok, tmp_path):
    builder = CrossTokenizerTargets(manifest_for(tokenizer, 8), tokenizer, student_tok, cache_dir=tmp_path)
    builder._validator.sampled = True  # a sampled cache's manifest says so (targets.kind); this one is hand-made
    base = make_sequence(tokenizer, [CASES["digits"], CASES["emoji"]], top_k=8)
    rng = np.random.default_rng(3)
    ids, lp, tail, _ = sampled_rows(rng, base.length, len(tokenizer), 16, 8)
    seq = CachedSequence(0, base.input_ids, base.offsets, ids, lp, tail, base.pooled_hidden, base.text, 0)
    out = builder(seq)
    kd = out["kd_mask"]
    assert kd.sum() > 3 and not np.isnan(out["topk_logprobs"]).any() and not np.isnan(out["tail_logprob"]).any()
    assert (out["topk_logprobs"][kd] <= 1e-6).all() and (out["topk_ids"][~kd] == -1).all()
    mass = np.where(out["topk_ids"][kd] >= 0, np.exp(out["topk_logprobs"][kd].astype(np.float64)), 0.0).sum(1)
    np.testing.assert_allclose(mass + np.exp(out["tail_logprob"][kd].astype(np.float64)), 1.0, rtol=1e-5)
