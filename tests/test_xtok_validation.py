"""Per-sequence validation on both target paths (`distill.data.validation`): damaged ids or log-probs stop the loader
with one line naming the shard file, the global sequence index and the fix, instead of training on garbage."""

from __future__ import annotations

import numpy as np
import pytest
from xtok_fixtures import trained_tokenizer, write_text_cache

from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from distill.data.dataset import DirectTargets, make_target_builder
from distill.data.validation import SequenceValidator
from distill.data.xtok.pipeline import CrossTokenizerTargets

DAMAGE = {
    "teacher id past the vocabulary": lambda s, v: s.topk_ids.__setitem__((2, 1), v),
    "negative teacher id": lambda s, v: s.topk_ids.__setitem__((2, 1), -5),
    "input id past the vocabulary": lambda s, v: s.input_ids.__setitem__(3, v + 7),
    "NaN log-prob": lambda s, v: s.topk_logprobs.__setitem__((1, 0), np.nan),
    "positive log-prob": lambda s, v: s.topk_logprobs.__setitem__((1, 2), 0.5),
    "-inf log-prob": lambda s, v: s.topk_logprobs.__setitem__((4, 2), -np.inf),
    "-inf tail (top-k cache)": lambda s, v: s.tail_logprob.__setitem__(0, -np.inf),
    "NaN tail": lambda s, v: s.tail_logprob.__setitem__(0, np.nan),
    "NaN pooled hidden": lambda s, v: s.pooled_hidden.__setitem__((0, 0), np.nan),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer, corpus):
    return write_text_cache(tmp_path_factory.mktemp("validate"), tokenizer, corpus[:30], max_length=48,
                            shard_size=4, max_sequences=10)


def _writable(seq):
    for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "pooled_hidden"):
        setattr(seq, name, np.array(getattr(seq, name)))
    return seq


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_sequences_fail_with_one_line_naming_shard_index_and_fix(cache, tokenizer, damage):
    reader = TeacherCacheReader(cache, check_finite=False)  # the reader's own NaN check would fire first
    validate = SequenceValidator(reader)
    for i in range(len(reader)):
        validate(reader[i])  # a sound cache passes
    seq = _writable(reader[6])  # shard 1 (4 sequences per shard)
    DAMAGE[damage](seq, reader.vocab_size)
    with pytest.raises(schema.CacheError) as err:
        validate(seq)
    message = str(err.value)
    assert "\n" not in message and str(cache / schema.shard_name(1)) in message and "sequence 6 " in message
    assert f"cache_tools verify {cache}" in message and "--resume" in message


def test_sampled_caches_may_have_an_empty_tail_but_not_a_nan(cache):
    validate = SequenceValidator(TeacherCacheReader(cache))
    validate.sampled = True
    seq = _writable(TeacherCacheReader(cache)[0])
    seq.tail_logprob[:] = -np.inf
    seq.topk_ids[:, -2:] = -1  # padding
    validate(seq)
    seq.tail_logprob[1] = np.nan
    with pytest.raises(schema.CacheError, match="sequence 0 holds a NaN or positive tail"):
        validate(seq)


def test_both_target_paths_validate(cache, tokenizer, corpus):
    reader = TeacherCacheReader(cache, check_finite=False)
    direct = make_target_builder(reader, tokenizer, len(tokenizer))
    cross = CrossTokenizerTargets(reader, tokenizer, trained_tokenizer(corpus, 400, split_digits=True))
    assert isinstance(direct, DirectTargets)
    for builder in (direct, cross):
        builder(reader[3])
        seq = _writable(reader[3])
        seq.topk_ids[5, 0] = reader.vocab_size
        with pytest.raises(schema.CacheError, match=r"shard-00000\.h5: sequence 3 holds teacher ids outside"):
            builder(seq)
    # A damaged vocabulary map (student ids past the student's vocabulary) is caught on the way out.
    cross.vocab_map.ids[:] = 10**6
    cross._mapper = type(cross._mapper)(cross.vocab_map.ids, cross.vocab_map.exact)
    with pytest.raises(schema.CacheError, match="maps to student ids outside"):
        cross(reader[3])
