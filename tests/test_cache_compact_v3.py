"""Format 3 compact caches end to end: blobs are bound to their rows (a blob swapped between rows, checksums
updated, is refused by verify and by the reader with one line naming shard and sequence), format 2 compact caches
(the bit coder's blobs, written as the version 2 builder did) stay readable with the same targets, and the input ids
and text of a compact cache, one window blob per row, read as the datasets that format 3 compact caches written
before window blobs hold (still readable)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.verify import format_notes, verify_cache

N, K = 12, 8


def _targets(kind: str, encoding: str) -> schema.TargetsInfo:
    if kind == "topk":
        return schema.TargetsInfo(kind="topk", encoding=encoding, top_k=K)
    return schema.TargetsInfo(kind="sampled", encoding=encoding, top_k=0, num_samples=N, seed=3)


def _make(tmp_path, tokenizer, corpus, kind: str, encoding: str, version: int = schema.FORMAT_VERSION):
    return write_synthetic_cache(tmp_path / f"{kind}-{encoding}-v{version}", tokenizer, corpus, num_sequences=6,
                                 shard_size=4, max_length=16, top_k=K, targets=_targets(kind, encoding),
                                 format_version=version)


def _reseal(cache) -> None:
    """Update the shard checksums in the manifest and sidecar, as someone editing a shard on purpose would."""
    m = schema.load_manifest(cache)
    path = cache / m.shards[0].file
    m.shards[0].bytes, m.shards[0].sha256 = path.stat().st_size, schema.file_sha256(path)
    m.save(cache)


@pytest.mark.parametrize("kind, blob", [("topk", schema.TOPK_BLOB), ("sampled", schema.SAMPLE_BLOB),
                                        ("topk", schema.OFFSETS_BLOB), ("sampled", schema.WINDOW_BLOB)])
def test_blob_swapped_between_rows_is_refused(tmp_path, tokenizer, corpus, kind, blob):
    cache = _make(tmp_path, tokenizer, corpus, kind, "compact")
    assert verify_cache(cache) == []
    with h5py.File(cache / schema.shard_name(0), "r+") as f:
        a, b = f[blob][1], f[blob][2]
        f[blob][1], f[blob][2] = b, a
    _reseal(cache)
    faults = verify_cache(cache)
    assert len(faults) == 1 and "row 1 (sequence 1)" in faults[0] and "another row's blob" in faults[0], faults
    reader = TeacherCacheReader(cache)
    with pytest.raises(schema.CacheError, match=r"shard-00000.h5: sequence 1 \(row 1\) unreadable") as info:
        reader[1]
    assert "\n" not in str(info.value)
    reader[0], reader[3]  # the rows not swapped still read


def test_same_row_of_another_shard_is_refused(tmp_path, tokenizer, corpus):
    """Row 0 of shard 1 (sequence 4) given row 0 of shard 0's blob: same row number, another sequence."""
    cache = _make(tmp_path, tokenizer, corpus, "topk", "compact")
    with h5py.File(cache / schema.shard_name(0), "r") as f:
        foreign = f[schema.TOPK_BLOB][0]
    with h5py.File(cache / schema.shard_name(1), "r+") as f:
        f[schema.TOPK_BLOB][0] = foreign
    with pytest.raises(schema.CacheError, match=r"shard-00001.h5: sequence 4 \(row 0\) unreadable.*sequence 4"):
        TeacherCacheReader(cache)[4]


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_format_2_compact_cache_reads_the_same_targets(tmp_path, tokenizer, corpus, kind):
    old = _make(tmp_path, tokenizer, corpus, kind, "compact", version=2)
    new = _make(tmp_path, tokenizer, corpus, kind, "compact")
    assert schema.load_manifest(old).format_version == 2 and verify_cache(old) == []
    with h5py.File(old / schema.shard_name(0), "r") as f:
        assert f[schema.OFFSETS_BLOB][0][3] == 1  # the format 2 bit coder's blob version
    a, b = TeacherCacheReader(old), TeacherCacheReader(new)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].topk_ids, b[i].topk_ids)
        np.testing.assert_array_equal(a[i].topk_logprobs, b[i].topk_logprobs)
        np.testing.assert_array_equal(a[i].offsets, b[i].offsets)


def test_format_3_compact_blobs_are_not_much_larger_than_format_2_on_tiny_windows(tmp_path, tokenizer, corpus):
    """Not a goal (bench measures those at Qwen's vocabulary), a sanity check that the new blobs are not larger."""
    old = _make(tmp_path, tokenizer, corpus, "topk", "compact", version=2)
    new = _make(tmp_path, tokenizer, corpus, "topk", "compact")

    def blob_bytes(cache):
        total = 0
        for shard in schema.load_manifest(cache).shards:
            with h5py.File(cache / shard.file, "r") as f:
                total += sum(len(v) for v in f[schema.TOPK_BLOB][:])
        return total

    assert blob_bytes(new) < 1.25 * blob_bytes(old)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_window_blobs_read_as_the_arrays_of_earlier_format_3_caches(tmp_path, tokenizer, corpus, kind):
    """A compact cache as build-cache writes it now (window_blob) and one as it wrote before (input_ids + text
    datasets, no window_encoding in the manifest: what caches of earlier format 3 builds hold) read the same."""
    import json

    new = _make(tmp_path, tokenizer, corpus, kind, "compact")
    old = write_synthetic_cache(tmp_path / "arrays", tokenizer, corpus, num_sequences=6, shard_size=4, max_length=16,
                                top_k=K, targets=_targets(kind, "compact"), window_encoding="arrays")
    data = json.loads((old / schema.MANIFEST_NAME).read_text())
    del data["window_encoding"]
    (old / schema.MANIFEST_NAME).write_text(json.dumps(data))
    assert schema.load_manifest(old).window_encoding == "arrays"
    assert schema.load_manifest(new).window_encoding == "compact"
    with h5py.File(new / schema.shard_name(0), "r") as f:
        assert schema.WINDOW_BLOB in f and schema.INPUT_IDS not in f and schema.TEXT not in f
    with h5py.File(old / schema.shard_name(0), "r") as f:
        assert schema.WINDOW_BLOB not in f and schema.INPUT_IDS in f and schema.TEXT in f
    assert verify_cache(old) == [] and verify_cache(new) == []
    assert any("window blobs" in note for note in format_notes(old)) and format_notes(new) == []
    a, b = TeacherCacheReader(old), TeacherCacheReader(new)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].input_ids, b[i].input_ids)
        assert a[i].input_ids.dtype == b[i].input_ids.dtype == np.int64
        assert a[i].text == b[i].text
        np.testing.assert_array_equal(a[i].topk_ids, b[i].topk_ids)
    recorded = [s.windows_digest for s in schema.load_manifest(new).shards]
    assert recorded == [s.windows_digest for s in schema.load_manifest(old).shards]
    from cache_tools.format.windows import compute_shard_digest

    assert [compute_shard_digest(new / s.file) for s in schema.load_manifest(new).shards] == recorded


def test_damaged_window_blob_is_one_line_naming_shard_and_sequence(tmp_path, tokenizer, corpus):
    cache = _make(tmp_path, tokenizer, corpus, "sampled", "compact")
    with h5py.File(cache / schema.shard_name(1), "r+") as f:
        blob = f[schema.WINDOW_BLOB][1].copy()
        blob[-3] ^= 0x10
        f[schema.WINDOW_BLOB][1] = blob
    m = schema.load_manifest(cache)
    path = cache / m.shards[1].file
    m.shards[1].bytes, m.shards[1].sha256 = path.stat().st_size, schema.file_sha256(path)
    m.save(cache)
    with pytest.raises(schema.CacheError, match=r"shard-00001.h5: sequence 5 \(row 1\) unreadable .*window") as info:
        TeacherCacheReader(cache)[5]
    assert "\n" not in str(info.value)
    faults = verify_cache(cache)
    assert len(faults) == 1 and "shard-00001.h5" in faults[0] and "sequence 5" in faults[0], faults
