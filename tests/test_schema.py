"""The cache contract: id dtypes, tokenizer hashing, ShardWriter -> TeacherCacheReader round trip, atomicity."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.shard_io import ShardWriter

L, K, P, H, V = 8, 4, 2, 6, 300


def _batch(rng: np.random.Generator, n: int, start: int) -> dict:
    lengths = rng.integers(1, L + 1, size=n).astype(np.int32)
    return {
        schema.INPUT_IDS: rng.integers(0, V, size=(n, L)),
        schema.VALID_LENGTH: lengths,
        schema.DOC_INDEX: np.arange(start, start + n),
        schema.TEXT: [f"window {start + i} é 🙂" for i in range(n)],
        schema.OFFSETS: rng.integers(0, 20, size=(n, L, 2)),
        schema.TOPK_IDS: rng.integers(0, V, size=(n, L, K)),
        schema.TOPK_LOGPROBS: -rng.random((n, L, K)).astype(np.float16) * 5,
        schema.TAIL_LOGPROB: -rng.random((n, L)).astype(np.float32),
        schema.POOLED_HIDDEN: rng.standard_normal((n, P, H)).astype(np.float16),
    }


def _manifest(complete: bool = True, **targets) -> schema.CacheManifest:
    return schema.CacheManifest(
        complete=complete, tokenizer=schema.TokenizerInfo(vocab_size=V, content_hash="x"),
        targets=schema.TargetsInfo(top_k=K, **targets), max_length=L, shard_size=3,
        pooling=schema.PoolingInfo(layers=list(range(P)), hidden_size=H))


def _write_cache(tmp_path, shard_sizes=(3, 3, 2), complete=True):
    rng = np.random.default_rng(0)
    manifest = _manifest(complete)
    first, batches = 0, []
    for index, n in enumerate(shard_sizes):
        writer = ShardWriter(tmp_path, index, first, 3, manifest)
        batch = _batch(rng, n, first)
        writer.append(batch)
        manifest.shards.append(writer.finish())
        batches.append(batch)
        first += n
    manifest.num_sequences = first
    manifest.num_tokens = sum(s.num_tokens for s in manifest.shards)
    manifest.save(tmp_path)
    return manifest, batches


def test_id_dtype_is_smallest_that_holds_vocab():
    assert schema.id_dtype_for(49_152) == np.uint16
    assert schema.id_dtype_for(65_536) == np.uint16
    assert schema.id_dtype_for(65_537) == np.uint32
    assert schema.id_dtype_for(151_669) == np.uint32


def test_tokenizer_hash_stable_across_save_and_load(tokenizer, tokenizer_dir, corpus):
    from transformers import AutoTokenizer

    from examples.tiny_models import train_bpe_tokenizer

    assert schema.tokenizer_hash(tokenizer) == schema.tokenizer_hash(AutoTokenizer.from_pretrained(tokenizer_dir))
    other = train_bpe_tokenizer(corpus[:50], 400)
    assert schema.tokenizer_hash(other) != schema.tokenizer_hash(tokenizer)


def test_writer_reader_round_trip(tmp_path):
    manifest, batches = _write_cache(tmp_path)
    assert not list(tmp_path.glob("*.tmp")), "finished shards leave no temp files"
    assert (tmp_path / schema.shard_sidecar_name(0)).is_file()
    reader = TeacherCacheReader(tmp_path)
    assert len(reader) == 8
    flat = {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}
    for i in [0, 2, 3, 7]:
        seq = reader[i]
        n = int(flat[schema.VALID_LENGTH][i])
        assert seq.length == n
        np.testing.assert_array_equal(seq.topk_ids, flat[schema.TOPK_IDS][i, :n])
        np.testing.assert_array_equal(seq.topk_logprobs, flat[schema.TOPK_LOGPROBS][i, :n])
        np.testing.assert_array_equal(seq.pooled_hidden, flat[schema.POOLED_HIDDEN][i])
        assert seq.text == flat[schema.TEXT][i] and seq.doc_index == i
    sl = reader.read_slice(2, 7)  # spans three shards
    np.testing.assert_array_equal(sl[schema.TAIL_LOGPROB], flat[schema.TAIL_LOGPROB][2:7])
    assert list(sl[schema.TEXT]) == list(flat[schema.TEXT][2:7])
    with pytest.raises(IndexError):
        reader[8]


def test_reader_pickles_without_handles(tmp_path):
    _write_cache(tmp_path)
    reader = TeacherCacheReader(tmp_path)
    first = reader[4].text
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {} and clone[4].text == first


def test_incomplete_cache_refused(tmp_path):
    _write_cache(tmp_path, complete=False)
    with pytest.raises(schema.CacheError, match="incomplete.*--resume"):
        TeacherCacheReader(tmp_path)


def test_non_finite_targets_caught_at_load(tmp_path):
    import h5py

    _write_cache(tmp_path)
    with h5py.File(tmp_path / schema.shard_name(1), "r+") as f:  # planting bad data: a test may open shards
        f[schema.TOPK_LOGPROBS][0, 0, 0] = np.nan
    reader = TeacherCacheReader(tmp_path)
    with pytest.raises(schema.CacheError, match="shard-00001.h5.*NaN"):
        reader[3]


def test_aborted_writer_leaves_nothing(tmp_path):
    writer = ShardWriter(tmp_path, 0, 0, 3, _manifest())
    writer.append(_batch(np.random.default_rng(1), 2, 0))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_missing_manifest_message_names_fix(tmp_path):
    with pytest.raises(schema.CacheError, match="manifest.json: missing.*--resume"):
        schema.load_manifest(tmp_path)
