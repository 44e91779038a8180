"""The typed manifest: every key checked on load (one-line CacheError naming file and key), version handling
(v1 caches read as v2 top-k/fp16; a v2 cache refused by the v1 reader with a version error)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cache_v1 import write_v1_cache

from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.verify import verify_cache

REPO = Path(__file__).resolve().parent.parent
V1_COMMIT = "f265a7a"  # last commit whose cache_tools wrote and read only format version 1


@pytest.fixture
def v1_cache(tmp_path):
    arrays = write_v1_cache(tmp_path / "v1", np.random.default_rng(0))
    return tmp_path / "v1", arrays


def _edit_manifest(cache_dir: Path, edit) -> None:
    path = cache_dir / schema.MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_v1_cache_reads_as_topk_fp16(v1_cache):
    cache_dir, arrays = v1_cache
    m = schema.load_manifest(cache_dir)
    assert m.format_version == 1 and m.targets.kind == "topk" and m.targets.encoding == "fp16"
    assert m.slots == m.targets.top_k == 4 and m.targets.num_samples == 0
    reader = TeacherCacheReader(cache_dir)
    for i in range(len(reader)):
        seq, n = reader[i], int(arrays["valid_length"][i])
        assert seq.text == arrays["text"][i] and seq.length == n
        np.testing.assert_array_equal(seq.topk_ids, arrays["topk_ids"][i, :n].astype(np.int64))
        np.testing.assert_array_equal(seq.topk_logprobs, arrays["topk_logprobs"][i, :n].astype(np.float32))
        np.testing.assert_array_equal(seq.tail_logprob, arrays["tail_logprob"][i, :n])
        assert seq.offsets.dtype == np.int32
        np.testing.assert_array_equal(seq.offsets, arrays["offsets"][i, :n])
    assert verify_cache(cache_dir) == []


@pytest.mark.parametrize("key, edit, message", [
    ("tokenizer.vocab_size", lambda d: d["tokenizer"].pop("vocab_size"), "key tokenizer.vocab_size missing"),
    ("pooling.layers", lambda d: d["pooling"].update(layers="0,1"), "key pooling.layers is '0,1' (str), expected"),
    ("shards[0]", lambda d: d["shards"][0].pop("sha256"), "key shards[0].sha256 missing"),
    ("top_k", lambda d: d.pop("top_k"), "key top_k missing (format version 1)"),
    ("teacher", lambda d: d.update(teacher=[]), "key teacher must be an object"),
    ("complete", lambda d: d.update(complete="yes"), "key complete is 'yes' (str), expected bool"),
])
def test_bad_manifest_key_is_one_line_naming_file_and_key(v1_cache, key, edit, message):
    cache_dir, _ = v1_cache
    _edit_manifest(cache_dir, edit)
    with pytest.raises(schema.CacheError) as info:
        schema.load_manifest(cache_dir)
    text = str(info.value)
    assert "\n" not in text and str(cache_dir / schema.MANIFEST_NAME) in text and message in text, text
    assert verify_cache(cache_dir) == [text]  # verify reports it as a fault, no traceback


@pytest.mark.parametrize("version, message", [
    ("2", "format_version is '2' (str), it must be an integer"),
    (4, "format version 4, this tool reads versions 1, 2, 3; upgrade"),
    (0, "format version 0, this tool reads versions 1, 2, 3; rebuild"),
])
def test_version_messages(v1_cache, version, message):
    cache_dir, _ = v1_cache
    _edit_manifest(cache_dir, lambda d: d.update(format_version=version))
    with pytest.raises(schema.CacheError, match=re.escape(message)):
        schema.load_manifest(cache_dir)


def test_unknown_target_kind_refused(tmp_path):
    m = schema.CacheManifest(targets=schema.TargetsInfo(kind="dense"))
    m.save(tmp_path)
    with pytest.raises(schema.CacheError, match=r"targets.kind is 'dense', expected one of topk, sampled"):
        schema.load_manifest(tmp_path)


def test_manifest_json_round_trip_is_typed(tmp_path):
    m = schema.CacheManifest(targets=schema.TargetsInfo(kind="sampled", encoding="compact", top_k=0, num_samples=16,
                                                        sample_temperature=2, seed=5),
                             pooling=schema.PoolingInfo(layers=[1, -1], hidden_size=8))
    m.save(tmp_path)
    back = schema.load_manifest(tmp_path)
    assert back == m and back.slots == 16 and isinstance(back.targets.sample_temperature, float)
    assert back.settings()["targets.num_samples"] == 16  # dotted keys: a resume mismatch names the field


def _v1_reader_module(tmp_path: Path):
    """cache_tools.format.schema as of the last version 1 commit, loaded beside today's package."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{V1_COMMIT}:cache_tools/format/schema.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git history with commit {V1_COMMIT}")
    path = tmp_path / "schema_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("schema_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["schema_v1"] = module
    spec.loader.exec_module(module)
    return module


def test_v2_cache_refused_by_v1_reader_with_version_error(tmp_path, tokenizer, corpus):
    from cache_fixtures import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c", tokenizer, corpus, num_sequences=4, shard_size=4)
    old = _v1_reader_module(tmp_path)
    with pytest.raises(old.CacheError) as info:
        old.load_manifest(cache)
    message = str(info.value)
    assert f"format version {schema.FORMAT_VERSION}, this tool reads 1" in message and "\n" not in message
    attrs = __import__("cache_tools.format.shard_io", fromlist=["read_attrs"]).read_attrs(cache / schema.shard_name(0))
    assert attrs[schema.ATTR_FORMAT_VERSION] == schema.FORMAT_VERSION
    assert attrs[schema.ATTR_TARGET_KIND] == "topk"
