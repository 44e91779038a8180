"""Dataset over the teacher cache, collator, deterministic eval split, and the refusals at load time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_fixtures import write_synthetic_cache
from torch.utils.data import DataLoader

from cache_tools.format.errors import CacheError
from cache_tools.format.reader import TeacherCacheReader
from distill.data.dataset import CacheDataset, DirectTargets, DistillCollator, build_cache_data, split_eval_indices
from distill.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache"), tokenizer, corpus, num_sequences=16, shard_size=4)


def test_collator_pads_and_builds_next_token_labels():
    rng = np.random.default_rng(0)
    examples = []
    for n in (5, 3):
        examples.append({
            "input_ids": np.arange(10, 10 + n, dtype=np.int64),
            "topk_ids": rng.integers(0, 50, size=(n, 4)),
            "topk_logprobs": rng.normal(size=(n, 4)).astype(np.float32),
            "tail_logprob": rng.normal(size=n).astype(np.float32),
            "kd_mask": np.ones(n, dtype=np.bool_),
            "pooled_hidden": rng.normal(size=(2, 6)).astype(np.float32),
        })
    batch = DistillCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (2, 5) and batch["topk_ids"].shape == (2, 5, 4)
    assert batch["pooled_hidden"].shape == (2, 2, 6)
    assert batch["labels"][0].tolist() == [11, 12, 13, 14, IGNORE_INDEX]
    assert batch["labels"][1].tolist() == [11, 12, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["input_ids"][1, 3:].tolist() == [0, 0]
    assert batch["kd_mask"][1].tolist() == [True, True, True, False, False]
    assert (batch["topk_ids"][1, 3:] == -1).all()
    assert torch.equal(batch["topk_logprobs"][0], torch.from_numpy(examples[0]["topk_logprobs"]))


def test_lm_only_examples_give_no_teacher_keys():
    batch = DistillCollator(pad_token_id=7)([{"input_ids": np.array([1, 2, 3])}, {"input_ids": np.array([4, 5])}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"][1].tolist() == [5, IGNORE_INDEX, IGNORE_INDEX]


def test_dataset_matches_reader_and_survives_worker_processes(cache_dir, tokenizer):
    reader = TeacherCacheReader(cache_dir)
    ds = CacheDataset(reader, np.arange(len(reader)), DirectTargets())
    ex = ds[3]
    seq = reader[3]
    assert np.array_equal(ex["input_ids"], seq.input_ids) and ex["topk_ids"].dtype == np.int64
    assert ex["topk_logprobs"].dtype == np.float32 and ex["kd_mask"].all()
    collate = DistillCollator(tokenizer.pad_token_id)
    serial = list(DataLoader(ds, batch_size=4, collate_fn=collate))
    parallel = list(DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2))
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_split_is_deterministic_and_shard_aligned(cache_dir):
    reader = TeacherCacheReader(cache_dir)
    train, held = split_eval_indices(reader, 0.25)
    assert held.tolist() == list(range(12, 16))  # the last of 4 shards of 4 sequences
    assert train.tolist() == list(range(12))
    train2, held2 = split_eval_indices(TeacherCacheReader(cache_dir), 0.25)
    assert np.array_equal(train, train2) and np.array_equal(held, held2)
    assert len(split_eval_indices(reader, 0.0)[1]) == 0


def test_foreign_tokenizer_without_teacher_tokenizer_is_one_line_error(tmp_path, tokenizer, corpus):
    """A different student tokenizer takes the cross-tokenizer path, which needs the cache's own tokenizer: when it
    can be found neither in DIR/tokenizer/ nor at the manifest's path, the error says so in one line."""
    from cache_tools.format.errors import TokenizerError

    cache = write_synthetic_cache(tmp_path / "c", tokenizer, corpus, num_sequences=4, tokenizer_hash="f" * 64)
    with pytest.raises(TokenizerError, match="teacher tokenizer 'test-tokenizer': cannot load") as info:
        build_cache_data(cache, tokenizer, len(tokenizer))
    assert len(str(info.value).splitlines()) == 1


def test_refuses_cache_vocab_larger_than_student(cache_dir, tokenizer):
    with pytest.raises(CacheError, match="larger than the student"):
        build_cache_data(cache_dir, tokenizer, len(tokenizer) - 1)


def test_refuses_incomplete_cache(tmp_path, tokenizer, corpus):
    cache = write_synthetic_cache(tmp_path / "c", tokenizer, corpus, num_sequences=4, complete=False)
    with pytest.raises(CacheError, match="incomplete"):
        build_cache_data(cache, tokenizer, len(tokenizer))


def test_nan_targets_caught_at_load(tmp_path, tokenizer, corpus):
    cache = write_synthetic_cache(tmp_path / "c", tokenizer, corpus, num_sequences=8, shard_size=4, nan_sequence=5)
    data = build_cache_data(cache, tokenizer, len(tokenizer))
    data.train[4]  # clean neighbours load fine
    with pytest.raises(CacheError, match="NaN/Inf"):
        data.train[5]


def test_sampled_targets_refuse_kd_they_cannot_serve(tmp_path):
    """A sampled (RS-KD) cache defines forward KL only, at the temperature the samples were drawn at, and sets the
    KDConfig's target kind; a top-k manifest (format v1 manifests load as top-k) accepts every kind and temperature."""
    from types import SimpleNamespace

    from distill.losses import KD_KINDS, KDConfig
    from distill.training.modeling import kd_config_for_caches

    def reader(targets, name="c"):
        return SimpleNamespace(manifest=SimpleNamespace(targets=targets), cache_dir=tmp_path / name)

    sampled = reader(SimpleNamespace(kind="sampled", sample_temperature=2.0, num_samples=64))
    top_k = SimpleNamespace(kind="topk", sample_temperature=1.0, num_samples=0)
    assert kd_config_for_caches(KDConfig(kind="forward_kl", temperature=2.0), [sampled]).targets == "sampled"
    with pytest.raises(CacheError, match="reverse_kl") as info:
        kd_config_for_caches(KDConfig(kind="reverse_kl", temperature=2.0), [sampled])
    assert str(tmp_path / "c" / "manifest.json") in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(CacheError, match="--temperature 1 differs.*set --temperature 2"):
        kd_config_for_caches(KDConfig(kind="forward_kl", temperature=1.0), [sampled])
    with pytest.raises(CacheError, match="different target kinds"):
        kd_config_for_caches(KDConfig(temperature=2.0), [sampled, reader(top_k, "eval")])
    for kind in KD_KINDS:
        assert kd_config_for_caches(KDConfig(kind=kind, temperature=3.0), [reader(top_k)]).targets == "topk"


def test_eval_fraction_rounded_up_to_whole_shards_says_so(cache_dir, caplog):
    reader = TeacherCacheReader(cache_dir)  # 4 shards of 4 sequences
    with caplog.at_level("WARNING", logger="distill.data.dataset"):
        split_eval_indices(reader, 0.25)
    assert not caplog.records  # exactly a quarter: nothing to say
    with caplog.at_level("WARNING", logger="distill.data.dataset"):
        _, held = split_eval_indices(reader, 0.01)
    assert len(held) == 4
    assert "--eval_fraction 0.01: holds out 4 of 16 sequences (25.0%)" in caplog.text and "--eval_cache" in caplog.text
