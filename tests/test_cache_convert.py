"""`cache_tools convert`: fp16 <-> compact and format 2 compact -> format 3 without the teacher; lossless layouts
round-trip byte for byte, the result verifies, an interrupted conversion resumes, bad input is one line."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from cache_fixtures import write_synthetic_cache
from cache_testing import cache_arrays

from cache_tools.cli import main
from cache_tools.convert import convert_cache
from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.verify import format_notes, verify_cache

N, K = 12, 8


def _make(tmp_path, tokenizer, corpus, kind: str, encoding: str, version: int = schema.FORMAT_VERSION):
    targets = schema.TargetsInfo(kind="topk", encoding=encoding, top_k=K) if kind == "topk" else \
        schema.TargetsInfo(kind="sampled", encoding=encoding, top_k=0, num_samples=N, seed=3)
    cache = write_synthetic_cache(tmp_path / f"{kind}-{encoding}-v{version}", tokenizer, corpus, num_sequences=10,
                                  shard_size=4, max_length=16, top_k=K, targets=targets, format_version=version)
    tokenizer.save_pretrained(cache / schema.TOKENIZER_DIR)  # as build-cache saves it
    return cache


def _same_reads(a, b, exact_logprobs: bool = True) -> None:
    ra, rb = TeacherCacheReader(a), TeacherCacheReader(b)
    assert len(ra) == len(rb)
    for i in range(len(ra)):
        x, y = ra[i], rb[i]
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.offsets, y.offsets)
        np.testing.assert_array_equal(x.pooled_hidden, y.pooled_hidden)
        np.testing.assert_array_equal(x.tail_logprob, y.tail_logprob)
        assert (x.text, x.doc_index) == (y.text, y.doc_index)
        np.testing.assert_array_equal(np.sort(x.topk_ids, 1), np.sort(y.topk_ids, 1))
        if exact_logprobs:
            np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
            np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)


def test_sampled_fp16_compact_fp16_is_byte_identical(tmp_path, tokenizer, corpus):
    src = _make(tmp_path, tokenizer, corpus, "sampled", "fp16")
    compact, back = tmp_path / "compact", tmp_path / "back"
    assert main(["convert", str(src), str(compact), "--encoding", "compact"]) == 0
    assert main(["convert", str(compact), str(back), "--encoding", "fp16"]) == 0
    assert verify_cache(compact) == [] and verify_cache(back) == []
    assert schema.load_manifest(compact).targets.encoding == "compact"
    a, b = cache_arrays(src), cache_arrays(back)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    _same_reads(src, compact)


def test_topk_conversions(tmp_path, tokenizer, corpus):
    """fp16 -> compact quantises (same ids), compact -> fp16 rounds to fp16, and format 2 compact -> format 3
    compact decodes identically (the same levels)."""
    src = _make(tmp_path, tokenizer, corpus, "topk", "fp16")
    one, two = tmp_path / "one", tmp_path / "two"
    convert_cache(src, one, "compact")
    convert_cache(one, two, "fp16")
    _same_reads(src, one, exact_logprobs=False)
    _same_reads(one, two, exact_logprobs=False)
    for x, y in zip(TeacherCacheReader(one), TeacherCacheReader(two), strict=True):
        np.testing.assert_allclose(y.topk_logprobs, x.topk_logprobs.astype(np.float16), rtol=0, atol=0)
    old = _make(tmp_path, tokenizer, corpus, "topk", "compact", version=2)
    assert format_notes(old) and "not bound to their rows" in format_notes(old)[0]
    assert "no document pieces" in format_notes(old)[1]  # what a format 2 cache lacks for isolated packing
    new = tmp_path / "new"
    convert_cache(old, new, "compact")
    assert schema.load_manifest(new).format_version == schema.FORMAT_VERSION and format_notes(new) == []
    _same_reads(old, new)


def test_interrupted_conversion_resumes(tmp_path, tokenizer, corpus, monkeypatch):
    from cache_tools import convert

    src = _make(tmp_path, tokenizer, corpus, "sampled", "fp16")
    out = tmp_path / "out"
    real, calls = convert._convert_shard, []

    def failing(*args):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(args[-1].index)
        return real(*args)

    monkeypatch.setattr(convert, "_convert_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        convert_cache(src, out, "compact")
    assert not schema.load_manifest(out).complete and not list(out.glob("*.tmp"))
    monkeypatch.setattr(convert, "_convert_shard", real)
    assert convert_cache(src, out, "compact")["converted_shards"] == 2  # shard 0 kept, 1 and 2 converted
    assert verify_cache(out) == [] and schema.load_manifest(out).complete
    assert convert_cache(src, out, "compact")["converted_shards"] == 0  # nothing to do


def test_bad_source_and_output_are_one_line(tmp_path, tokenizer, corpus, capsys):
    src = _make(tmp_path, tokenizer, corpus, "topk", "compact")
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "o"), "--encoding", "fp16"]) == 2
    assert main(["convert", str(src), str(src), "--encoding", "fp16"]) == 2
    with h5py.File(src / schema.shard_name(1), "r+") as f:  # sequence 5's blob given sequence 4's
        f[schema.TOPK_BLOB][1] = f[schema.TOPK_BLOB][0]
    assert main(["convert", str(src), str(tmp_path / "o2"), "--encoding", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "no such cache directory" in err and "another folder than SRC" in err
    assert "shard-00001.h5: sequence 5 (row 1) unreadable" in err and "Traceback" not in err
    assert not (tmp_path / "o2" / schema.MANIFEST_NAME).is_file() or \
        not schema.load_manifest(tmp_path / "o2").complete


def test_compact_cache_with_window_arrays_converts_to_window_blobs(tmp_path, tokenizer, corpus):
    """A compact cache as format 3 builds wrote it before window blobs (input_ids + text datasets) -> convert
    --encoding compact stores its windows as blobs and reads the same (targets carried over exactly)."""
    targets = schema.TargetsInfo(kind="topk", encoding="compact", top_k=K)
    src = write_synthetic_cache(tmp_path / "arrays", tokenizer, corpus, num_sequences=10, shard_size=4,
                                max_length=16, top_k=K, targets=targets, window_encoding="arrays")
    tokenizer.save_pretrained(src / schema.TOKENIZER_DIR)  # as build-cache saves it
    out = tmp_path / "blobs"
    assert main(["convert", str(src), str(out), "--encoding", "compact"]) == 0
    assert schema.load_manifest(out).window_encoding == "compact" and verify_cache(out) == []
    with h5py.File(out / schema.shard_name(0), "r") as f:
        assert schema.WINDOW_BLOB in f and schema.INPUT_IDS not in f
    _same_reads(src, out)
