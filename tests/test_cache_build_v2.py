"""build-cache for format v2: the option dataclass parsed by HfArgumentParser (both flag spellings), bad target
flags refused up front, sampled and compact builds end to end (deterministic, resumable), NUL text round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cache_testing import assert_same_cache
from test_cache_targets import assert_same_offsets, assert_same_targets

from cache_tools.build_options import BuildOptions
from cache_tools.builder import build_cache
from cache_tools.cli import _parser, build_options, main
from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.verify import verify_cache


def _opts(teacher, text_file, out, **kw) -> BuildOptions:
    base = dict(teacher=str(teacher), dataset=str(text_file), output=str(out), max_length=24, shard_size=3,
                batch_size=2, max_samples=2, progress=False)
    base.update(kw)
    return BuildOptions(**base)


def _parse(*flags: str) -> BuildOptions:
    args = _parser().parse_args(["build-cache", "--teacher", "t", "--dataset", "d", "--output", "o", *flags])
    return build_options(args)


def test_both_flag_spellings_and_pool_layer_lists_parse_alike():
    dashed = _parse("--top-k", "8", "--max-length", "32", "--pool-layers", "2,-1", "--no-progress", "--resume",
                    "--sample-temperature", "0.5")
    underscored = _parse("--top_k", "8", "--max_length", "32", "--pool_layers", "2", "-1", "--no_progress",
                         "--resume", "true", "--sample_temperature", "0.5")
    assert dashed == underscored
    assert dashed.top_k == 8 and dashed.pool_layers == [2, -1] and not dashed.progress and dashed.resume
    assert dashed.sample_temperature == 0.5 and dashed.max_length == 32
    defaults = _parse()
    assert (defaults.targets, defaults.encoding, defaults.top_k, defaults.samples, defaults.pool_layers) == \
        ("topk", "auto", None, None, [-1])


@pytest.mark.parametrize("flags, encoding", [
    ([], "fp16"), (["--targets", "sampled"], "compact"),
    (["--encoding", "compact"], "compact"), (["--targets", "sampled", "--encoding", "fp16"], "fp16"),
])
def test_auto_encoding_is_compact_for_sampled_and_fp16_for_topk(flags, encoding):
    from cache_tools.build_options import targets_info

    assert targets_info(_parse(*flags)).encoding == encoding


@pytest.mark.parametrize("flags, message", [
    (["--targets", "sampled", "--samples", "0"], "--samples 0: must be >= 1"),
    (["--targets", "sampled", "--samples", "70000"], "--samples 70000: too large for the count dtype (uint16"),
    (["--targets", "sampled", "--top-k", "8"], "--top-k 8 with --targets sampled"),
    (["--samples", "16"], "--samples 16 needs --targets sampled"),
    (["--targets", "sampled", "--sample-temperature", "0"], "--sample-temperature 0.0: must be > 0"),
    (["--encoding", "zip"], "invalid command line: argument --encoding: invalid choice: 'zip'"),
    (["--targets", "dense"], "invalid command line: argument --targets: invalid choice"),
    (["--top-k", "eight"], "invalid command line: argument --top_k/--top-k: invalid int value"),
])
def test_bad_target_flags_one_line_exit_2_nothing_written(tmp_path, capsys, teacher_dir, text_file, flags, message):
    out = tmp_path / "out"
    code = main(["build-cache", "--teacher", str(teacher_dir), "--dataset", str(text_file), "--output", str(out),
                 "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cache_tools build-cache: error: ") and message in err[0], err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, teacher_dir, text_file):
    out = tmp_path_factory.mktemp("sampled") / "c"
    build_cache(_opts(teacher_dir, text_file, out, targets="sampled", samples=16, seed=7, encoding="compact",
                      sample_temperature=2.0))
    return out


def test_sampled_build_records_targets_and_reads_back(sampled_cache):
    m = schema.load_manifest(sampled_cache)
    assert (m.targets.kind, m.targets.encoding, m.targets.num_samples, m.targets.seed) == ("sampled", "compact", 16, 7)
    assert m.targets.sample_temperature == 2.0 and m.targets.top_k == 0
    assert verify_cache(sampled_cache) == []
    reader = TeacherCacheReader(sampled_cache)
    assert reader.slots == 16
    seq = reader[0]
    used = seq.topk_ids >= 0
    assert np.isneginf(seq.tail_logprob).all()
    np.testing.assert_allclose(np.exp(np.where(used, seq.topk_logprobs, -np.inf).astype(np.float64)).sum(1), 1.0,
                               rtol=1e-6)  # counts/N over the distinct draws sum to exactly one
    # A temperature-2 teacher over 512 tokens spreads 16 draws over several distinct ids.
    assert used.sum(1).mean() > 2


def test_sampled_build_is_deterministic_and_resumes_byte_identical(sampled_cache, tmp_path, teacher_dir, text_file):
    again = tmp_path / "again"
    opts = _opts(teacher_dir, text_file, again, targets="sampled", samples=16, seed=7, encoding="compact",
                 sample_temperature=2.0)
    build_cache(opts)
    assert_same_cache(sampled_cache, again)
    (again / schema.shard_name(1)).unlink()
    build_cache(dataclasses.replace(opts, resume=True))
    assert_same_cache(sampled_cache, again)
    other_seed = tmp_path / "seed8"
    build_cache(dataclasses.replace(opts, output=str(other_seed), seed=8))
    assert TeacherCacheReader(other_seed)[0].topk_ids.tolist() != TeacherCacheReader(again)[0].topk_ids.tolist()


def test_compact_topk_build_matches_fp16(tmp_path, teacher_dir, text_file):
    fp16, compact = tmp_path / "fp16", tmp_path / "compact"
    build_cache(_opts(teacher_dir, text_file, fp16, top_k=8))
    build_cache(_opts(teacher_dir, text_file, compact, top_k=8, encoding="compact"))
    assert verify_cache(compact) == []
    a, b = TeacherCacheReader(fp16), TeacherCacheReader(compact)
    assert len(a) == len(b) > 1
    for i in range(len(a)):
        assert_same_targets(b[i], a[i])
        assert_same_offsets(b[i], a[i])  # the builder's real offsets, lossless: the same int32 [n, 2] bytes


def test_text_with_nul_bytes_round_trips(tmp_path, teacher_dir, corpus):
    docs = [corpus[0][:80] + "\x00after a NUL\x00\x00" + corpus[1][:60], "plain " + corpus[2][:50]]
    data = tmp_path / "nul.jsonl"
    import json

    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "c"
    build_cache(_opts(teacher_dir, data, out, top_k=4, max_length=512, shard_size=4, max_samples=None))
    reader = TeacherCacheReader(out)
    texts = [reader[i].text for i in range(len(reader))]
    assert "\x00after a NUL\x00\x00" in "".join(texts)
    assert texts[0].startswith(docs[0]) and verify_cache(out) == []


def test_writer_thread_passes_os_errors_through_for_the_one_line_boundary(tmp_path):
    from cache_tools.writer_thread import BackgroundShardWriter

    m = schema.CacheManifest(tokenizer=schema.TokenizerInfo(vocab_size=10, content_hash="x"),
                             targets=schema.TargetsInfo(top_k=2), max_length=4)
    writer = BackgroundShardWriter(tmp_path / "missing-folder", m)
    writer.open_shard(0, 0, 2)
    with pytest.raises(OSError) as info:  # not RuntimeError: run_cli turns an OSError into one line naming the file
        writer.close()
    assert "missing-folder" in str(info.value)
