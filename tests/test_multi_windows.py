"""Several teachers' caches must cover the same windows: per-shard digests recorded at build time (format version 3),
computed by reading ids + text for older caches, compared before training."""

from __future__ import annotations

import json
import shutil

import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.cli import main as cache_main
from cache_tools.convert import convert_cache
from cache_tools.format import schema
from cache_tools.format.errors import CacheMismatchError
from cache_tools.format.verify import format_notes, verify_cache
from cache_tools.format.windows import check_same_windows, compute_shard_digest, shard_digests


def _pair(cache_dir):
    return cache_dir, schema.load_manifest(cache_dir)


def _strip_digests(cache_dir):
    """The cache as a version 2 build wrote it: no digest in the manifest or the sidecars."""
    path = cache_dir / schema.MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 2
    for shard in data["shards"]:
        shard.pop("windows_digest")
    path.write_text(json.dumps(data))


def test_digest_recorded_at_build_time_equals_the_one_read_back(tmp_path, tokenizer, corpus):
    cache = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=8, shard_size=4)
    m = schema.load_manifest(cache)
    assert m.format_version == schema.FORMAT_VERSION == 3
    recorded = [s.windows_digest for s in m.shards]
    assert all(len(d) == 64 for d in recorded) and recorded[0] != recorded[1]
    assert recorded == [compute_shard_digest(cache / s.file) for s in m.shards]
    sidecar = json.loads((cache / schema.shard_sidecar_name(0)).read_text())
    assert sidecar["windows_digest"] == recorded[0]
    from cache_tools.inspect_cache import cache_summary

    assert cache_summary(cache)["windows_digests"] == "recorded"
    _strip_digests(cache)
    assert cache_summary(cache)["windows_digests"].startswith("not recorded")
    old = schema.load_manifest(cache)
    assert [s.windows_digest for s in old.shards] == ["", ""]
    assert shard_digests(cache, old) == recorded  # older caches: the same value, computed from ids and text


def test_two_teachers_on_the_same_windows_pass_and_a_v2_cache_is_checked_by_reading(tmp_path, tokenizer, corpus):
    a = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=8, shard_size=4, seed=0)
    b = write_synthetic_cache(tmp_path / "b", tokenizer, corpus, num_sequences=8, shard_size=4, seed=1,
                              targets=schema.TargetsInfo(kind="sampled", encoding="compact", num_samples=8))
    check_same_windows([_pair(a), _pair(b)])
    _strip_digests(b)
    check_same_windows([_pair(a), _pair(b)])


def test_other_text_is_refused_naming_both_caches_and_the_first_differing_shard(tmp_path, tokenizer, corpus):
    a = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=8, shard_size=4)
    b = write_synthetic_cache(tmp_path / "b", tokenizer, corpus, num_sequences=8, shard_size=4, seed=1)
    c = write_synthetic_cache(tmp_path / "c", tokenizer, [t[::-1] for t in corpus], num_sequences=8, shard_size=4)
    # b's second shard replaced by one over other text (its manifest entry too): shard 0 matches, shard 1 does not.
    shutil.copy(c / schema.shard_name(1), b / schema.shard_name(1))
    mb = schema.load_manifest(b)
    mb.shards[1] = schema.load_manifest(c).shards[1]
    mb.save(b)
    da, db = shard_digests(a, schema.load_manifest(a)), shard_digests(b, schema.load_manifest(b))
    assert da[0] == db[0] and da[1] != db[1]
    first = 1
    with pytest.raises(CacheMismatchError) as info:
        check_same_windows([_pair(a), _pair(b)])
    msg = str(info.value)
    assert str(a) in msg and str(b) in msg and schema.shard_name(first) in msg and "\n" not in msg
    _strip_digests(b)  # the same refusal when one side's digests must be computed
    with pytest.raises(CacheMismatchError, match=schema.shard_name(first)):
        check_same_windows([_pair(a), _pair(b)])


@pytest.mark.parametrize("change", ["max_length", "shard_size", "tokenizer"])
def test_other_window_settings_are_refused(tmp_path, tokenizer, corpus, change):
    a = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=8, shard_size=4)
    kwargs = {"max_length": dict(max_length=20), "shard_size": dict(shard_size=2),
              "tokenizer": dict(tokenizer_hash="0" * 64)}[change]
    b = write_synthetic_cache(tmp_path / "b", tokenizer, corpus, num_sequences=8, **{"shard_size": 4, **kwargs})
    with pytest.raises(CacheMismatchError) as info:
        check_same_windows([_pair(a), _pair(b)])
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_verify_checks_the_recorded_digest(tmp_path, tokenizer, corpus):
    cache = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=4, shard_size=4)
    assert verify_cache(cache) == []
    path = cache / schema.MANIFEST_NAME
    data = json.loads(path.read_text())
    data["shards"][0]["windows_digest"] = "0" * 64
    path.write_text(json.dumps(data))
    faults = verify_cache(cache)
    assert len(faults) == 1 and "windows digest" in faults[0], faults


def test_verify_notes_what_a_cache_without_digests_lacks(tmp_path, tokenizer, corpus, capsys):
    old = write_synthetic_cache(tmp_path / "old", tokenizer, corpus, num_sequences=8, shard_size=4, format_version=2)
    _strip_digests(old)  # a format 2 build: verify finds nothing wrong, and says what the cache lacks
    assert verify_cache(old) == []
    assert cache_main(["verify", str(old)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "windows digest" in line]
    assert len(notes) == 1 and "note: 2 of 2 shards record no windows digest" in notes[0], notes
    assert "--encoding fp16" in notes[0] and "--cache A --cache B" in notes[0]
    convert_cache(old, tmp_path / "new", "fp16")
    assert not any("windows digest" in note for note in format_notes(tmp_path / "new"))
    assert not any("windows digest" in note for note in format_notes(write_synthetic_cache(
        tmp_path / "v3", tokenizer, corpus, num_sequences=4, shard_size=4)))
