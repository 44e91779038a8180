"""Every target kind x encoding through the real writer, reader, verify and inspect: the reader returns the same
per-sequence fields for all of them (sampled: log(count / N), tail -inf, -1 padding), verify checks the v2
invariants, inspect reports kind / encoding / bytes per dataset and damaged shards."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.format import schema, shard_io
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.verify import verify_cache
from cache_tools.inspect_cache import cache_summary, format_summary

N, K = 12, 8
COMBOS = [("topk", "fp16"), ("topk", "compact"), ("sampled", "fp16"), ("sampled", "compact")]


def _targets(kind: str, encoding: str) -> schema.TargetsInfo:
    if kind == "topk":
        return schema.TargetsInfo(kind="topk", encoding=encoding, top_k=K)
    return schema.TargetsInfo(kind="sampled", encoding=encoding, top_k=0, num_samples=N, seed=3)


@pytest.fixture
def make_cache(tmp_path, tokenizer, corpus):
    def make(kind: str, encoding: str, name: str | None = None):
        return write_synthetic_cache(tmp_path / (name or f"{kind}-{encoding}"), tokenizer, corpus, num_sequences=6,
                                     shard_size=4, max_length=16, top_k=K, targets=_targets(kind, encoding))
    return make


def assert_same_targets(seq, ref) -> None:
    """Same support per position and the same probabilities: exactly for lossless layouts, within the compact top-k
    quantisation (log-probs on a companded 6-bit scale below each row's exact maximum) otherwise. Rows are compared in
    id order: compact top-k decodes ties in log-prob in id order."""
    order, ref_order = np.argsort(seq.topk_ids, axis=1), np.argsort(ref.topk_ids, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(seq.topk_ids, order, 1),
                                  np.take_along_axis(ref.topk_ids, ref_order, 1))
    p = np.exp(np.take_along_axis(seq.topk_logprobs, order, 1).astype(np.float64))
    ref_p = np.exp(np.take_along_axis(ref.topk_logprobs, ref_order, 1).astype(np.float64))
    np.testing.assert_allclose(p, ref_p, atol=0.01, rtol=0.1)
    assert (np.diff(seq.topk_logprobs, axis=1) <= 0).all() or (seq.topk_ids < 0).any()  # top-k stays sorted
    np.testing.assert_array_equal(seq.tail_logprob, ref.tail_logprob)


def assert_same_offsets(seq, ref) -> None:
    """Offsets are lossless in every layout: the same int32 [n, 2] array, byte for byte."""
    assert seq.offsets.dtype == ref.offsets.dtype == np.int32 and seq.offsets.flags.c_contiguous
    assert seq.offsets.shape == ref.offsets.shape == (seq.length, 2)
    assert seq.offsets.tobytes() == ref.offsets.tobytes()
    assert ref.offsets[-1, 1] > 0, "the fixture's offsets must cover the text (a zero array would prove nothing)"


@pytest.mark.parametrize("kind, encoding", COMBOS)
def test_reader_fields_same_for_every_kind_and_encoding(make_cache, kind, encoding):
    cache = make_cache(kind, encoding)
    reference = TeacherCacheReader(make_cache(kind, "fp16", "reference"))
    reader = TeacherCacheReader(cache)
    assert reader.manifest.targets.kind == kind and reader.manifest.targets.encoding == encoding
    assert reader.slots == (K if kind == "topk" else N)
    for i in range(len(reader)):
        seq, ref = reader[i], reference[i]
        assert seq.topk_ids.dtype == np.int64 and seq.topk_ids.shape == (seq.length, reader.slots)
        assert seq.topk_logprobs.dtype == np.float32 and seq.tail_logprob.dtype == np.float32
        assert_same_targets(seq, ref)
        assert_same_offsets(seq, ref)
        if kind == "sampled":
            used = seq.topk_ids >= 0
            assert np.isneginf(seq.tail_logprob).all() and used[:, 0].all()
            counts = np.rint(np.exp(seq.topk_logprobs.astype(np.float64)) * N).astype(np.int64)
            np.testing.assert_array_equal(np.where(used, counts, 0).sum(1), N)
            np.testing.assert_array_equal(seq.topk_logprobs[used], np.log(counts[used] / N).astype(np.float32))
            assert (seq.topk_logprobs[~used] == 0).all()
    assert verify_cache(cache) == []


@pytest.mark.parametrize("kind, encoding", COMBOS)
def test_inspect_reports_kind_encoding_and_bytes_per_dataset(make_cache, kind, encoding):
    cache = make_cache(kind, encoding)
    summary = cache_summary(cache)
    assert summary["targets"]["kind"] == kind and summary["targets"]["encoding"] == encoding
    split = summary["bytes_per_token_by_dataset"]
    assert set(split) == set(schema.dataset_names(schema.load_manifest(cache))) and all(v > 0 for v in split.values())
    # The split counts stored data, not the HDF5 metadata: it sums to at most the files' bytes.
    assert sum(split.values()) <= summary["bytes_per_token"]
    assert summary["state"] == "complete" and "target_kind" not in format_summary(summary)


def test_inspect_says_damaged_instead_of_complete(make_cache):
    cache = make_cache("topk", "fp16")
    (cache / schema.shard_name(1)).unlink()
    with open(cache / schema.shard_name(0), "r+b") as f:
        f.truncate(1000)
    summary = cache_summary(cache)
    assert summary["state"].startswith("DAMAGED: 2 shard(s)") and not summary["complete"]
    assert any("shard-00001.h5: missing" in p for p in summary["shard_problems"])


def _plant(cache, name: str, edit) -> None:
    with h5py.File(cache / schema.shard_name(0), "r+") as f:  # planting bad data: tests may open shards directly
        edit(f[name])
    m = schema.load_manifest(cache)  # keep checksums valid so verify reaches the content checks
    path = cache / m.shards[0].file
    m.shards[0].bytes, m.shards[0].sha256 = path.stat().st_size, schema.file_sha256(path)
    m.save(cache)


def _offsets_blob(blob, sequence: int, *edits: tuple[int, tuple[int, int]]):
    """A valid offsets blob of row `sequence` (checksum and all) holding the offsets of `blob` with some tokens'
    (start, end) changed: damage only the content check can see."""
    from cache_tools.format import codec_zstd

    offsets = codec_zstd.decode_offsets(blob, 16, sequence=sequence)
    for token, pair in edits:
        offsets[token] = pair
    return codec_zstd.encode_offsets(offsets, sequence=sequence)


def _set(ds, index, value):
    data = ds[...]
    data[index] = value
    ds[...] = data


@pytest.mark.parametrize("kind, encoding, name, edit, fault", [
    ("sampled", "fp16", schema.SAMPLE_COUNTS, lambda ds: _set(ds, (1, 2, 0), ds[1, 2, 0] + 1), "sum to 13, not"),
    ("sampled", "fp16", schema.SAMPLE_IDS, lambda ds: _set(ds, (0, 0, 0), 999), "target ids >= vocab_size"),
    ("sampled", "fp16", schema.SAMPLE_IDS, lambda ds: _set(ds, (0, 3, 1), ds[0, 3, 0]), "duplicate ids"),
    ("topk", "fp16", schema.TOPK_IDS, lambda ds: _set(ds, (2, 0, 1), ds[2, 0, 0]), "duplicate ids"),
    ("topk", "fp16", schema.TOPK_LOGPROBS, lambda ds: _set(ds, (0, 1, 0), 0.5), "log-probs > 0"),
    ("topk", "fp16", schema.OFFSETS, lambda ds: _set(ds, (2, 3, 1), 10**6), "row 2: token 3 has offsets ("),
    ("sampled", "fp16", schema.OFFSETS, lambda ds: _set(ds, (1, 0, 0), -1), "row 1: token 0 has offsets (-1, "),
    ("topk", "compact", schema.OFFSETS_BLOB, lambda ds: ds.__setitem__(3, _offsets_blob(ds[3], 3, (4, (5, 4)))),
     "row 3: token 4 has offsets (5, 4), not within 0 <= start <= end <= "),
])
def test_verify_finds_planted_faults(make_cache, kind, encoding, name, edit, fault):
    cache = make_cache(kind, encoding)
    assert verify_cache(cache) == []
    _plant(cache, name, edit)
    faults = verify_cache(cache)
    assert len(faults) == 1 and fault in faults[0] and faults[0].startswith("shard-00000.h5: sequences 0..3"), faults


@pytest.mark.parametrize("kind, blob, fault", [
    ("topk", schema.TOPK_BLOB, "row 1 (sequence 1): targets not decodable"),
    ("sampled", schema.SAMPLE_BLOB, "row 1 (sequence 1): targets not decodable"),
    ("topk", schema.OFFSETS_BLOB, "row 1 (sequence 1): token offsets not decodable (token-offsets blob"),
])
def test_undecodable_blob_is_a_fault_and_a_one_line_read_error(make_cache, kind, blob, fault):
    cache = make_cache(kind, "compact")
    with h5py.File(cache / schema.shard_name(0), "r+") as f:
        f[blob][1] = f[blob][1][:5]  # a truncated blob
    m = schema.load_manifest(cache)
    path = cache / m.shards[0].file
    m.shards[0].bytes, m.shards[0].sha256 = path.stat().st_size, schema.file_sha256(path)
    m.save(cache)
    faults = verify_cache(cache)
    assert len(faults) == 1 and fault in faults[0] and "\n" not in faults[0], faults
    with pytest.raises(schema.CacheError, match=r"shard-00000.h5: sequence 1 \(row 1\) unreadable"):
        TeacherCacheReader(cache)[1]


def test_shard_attrs_and_layout_follow_the_table(make_cache):
    cache = make_cache("sampled", "compact")
    m = schema.load_manifest(cache)
    attrs = shard_io.read_attrs(cache / schema.shard_name(0))
    assert attrs[schema.ATTR_FORMAT_VERSION] == schema.FORMAT_VERSION == 3
    assert (attrs[schema.ATTR_TARGET_KIND], attrs[schema.ATTR_ENCODING], attrs[schema.ATTR_NUM_SAMPLES]) == \
        ("sampled", "compact", N)
    with shard_io.open_shard(cache / schema.shard_name(0)) as f:
        assert sorted(f.keys()) == sorted(schema.dataset_names(m))
        assert schema.TOPK_IDS not in f and schema.SAMPLE_COUNTS not in f and schema.OFFSETS not in f
        assert f[schema.OFFSETS_BLOB].shape == (4,) and f[schema.OFFSETS_BLOB][0].dtype == np.uint8


def test_every_check_the_table_names_exists():
    from cache_tools.format.verify import CHECKS

    named = {check for spec in schema.DATASETS for check in spec.checks}
    assert named and named <= set(CHECKS), named - set(CHECKS)
