"""Precomputed cross-tokenizer targets (`python -m distill.prepare_xtok`, `distill/data/xtok/store.py`): what a
DataLoader worker reads back is BIT-IDENTICAL to on-the-fly computation (every array's dtype, shape and bytes, every
stat's value and type), on many hand-made windows and on real Qwen3 -> SmolLM2 windows when ../shared exists; a
stale, partial or damaged store is never used silently (fallback to on-the-fly, with a warning)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from xtok_fixtures import trained_tokenizer, write_text_cache

from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.text_data import pack_windows
from distill.data.dataset import CacheDataset
from distill.data.xtok.pipeline import CrossTokenizerTargets
from distill.data.xtok.prepare import prepare_store
from distill.prepare_xtok import main as prepare_main

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
QWEN, SMOL = SHARED / "tokenizers" / "qwen3", SHARED / "tokenizers" / "smollm2"


def assert_identical(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if key == "stats":
            assert list(got["stats"].items()) == list(value.items())
            assert [type(v) for v in got["stats"].values()] == [type(v) for v in value.values()]
            continue
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


@pytest.fixture(scope="module")
def student(corpus):
    return trained_tokenizer(corpus, 400, split_digits=True)


@pytest.fixture
def cache(tmp_path, tokenizer, corpus):
    """48 packed windows in 3 shards, K = 64 over a 512-token teacher vocabulary (merges in every row); window 5's
    text is altered so its teacher tokens no longer spell it (a skipped window: CE only, int stats)."""
    windows = list(pack_windows(tokenizer, enumerate(corpus[:90]), 96))[:48]
    windows[5] = dataclasses.replace(windows[5], text="X" + windows[5].text[1:])
    return TeacherCacheReader(write_text_cache(tmp_path / "cache", tokenizer, [], max_length=96, top_k=64,
                                               shard_size=16, windows=windows))


def check_all(reader, tokenizer, student, expect_store=True, **kw) -> CrossTokenizerTargets:
    fresh = CrossTokenizerTargets(reader, tokenizer, student, use_store=False, **kw)
    stored = CrossTokenizerTargets(reader, tokenizer, student, **kw)
    assert (stored.store is not None) == expect_store
    for i in range(len(reader)):
        assert_identical(stored.fetch(reader, i), fresh(reader[i]))
    if stored.store is not None:
        stored.store.close()  # the test edits the files next
    return stored


@pytest.mark.parametrize("rule,max_length,workers", [("first_token", None, 2), ("tail", 40, 1),
                                                     ("first_token", 0, 1)])
def test_stored_targets_are_bit_identical(cache, tokenizer, student, rule, max_length, workers, monkeypatch):
    if rule == "tail":  # the int32 id encoding of student vocabularies >= 65,535 rows, end to end
        import distill.data.xtok.store as store

        monkeypatch.setattr(store, "id_dtype", lambda rows: np.dtype(np.int32))
    builder = CrossTokenizerTargets(cache, tokenizer, student, rule=rule, max_length=max_length, use_store=False)
    done = prepare_store(builder, cache, workers=workers, batch=5)
    assert done["shards_written"] == 3 and done["windows"] == 48
    with h5py.File(Path(done["path"]) / cache.shards[0].file, "r") as f:
        assert f["topk_ids"].dtype == (np.int32 if rule == "tail" else np.uint16)
        assert f["topk_logprobs"].compression == "gzip" and f["input_ids"].compression == "gzip"
    stored = check_all(cache, tokenizer, student, rule=rule, max_length=max_length)
    stats = [stored.fetch(cache, i)["stats"] for i in range(len(cache))]
    assert stats[5]["skipped"] == 1 and sum(s["skipped"] for s in stats) == 1
    if max_length == 40:
        assert sum(s["truncated"] for s in stats) > 0
    # The trainer's dataset reads through `fetch`: no cache read, same example.
    assert_identical(CacheDataset(cache, np.arange(48), stored)[7], builder(cache[7]))
    # Another rule or max_length is another key: never read from this store.
    other = CrossTokenizerTargets(cache, tokenizer, student, rule="tail" if rule != "tail" else "first_token",
                                  max_length=max_length)
    assert other.store is None


def test_sampled_cache_store_is_bit_identical(tmp_path, tokenizer, student, corpus):
    """Sampled targets (tail -inf, -1 padding, counts merged per student id) round-trip exactly too."""
    reader = TeacherCacheReader(write_text_cache(tmp_path / "cache", tokenizer, corpus[:60], max_length=64,
                                                 shard_size=8, max_sequences=20, num_samples=12))
    assert reader.manifest.targets.kind == "sampled"
    builder = CrossTokenizerTargets(reader, tokenizer, student, use_store=False)
    prepare_store(builder, reader, workers=2, batch=3)
    check_all(reader, tokenizer, student)
    assert np.isneginf(builder(reader[0])["tail_logprob"]).any()


def test_stale_partial_and_damaged_stores_fall_back(cache, tokenizer, student, caplog):
    builder = CrossTokenizerTargets(cache, tokenizer, student, use_store=False)
    path = Path(prepare_store(builder, cache, workers=1)["path"])
    files = sorted(path.glob("shard-*"))
    assert len(files) == 3 and not list(path.glob(".*tmp*"))
    with h5py.File(files[0], "r+") as f:  # stale: computed for another source shard
        f.attrs["cache_shard_sha256"] = "0" * 64
    with h5py.File(files[1], "r+") as f:  # damaged content: an id far past the student vocabulary
        ids = f["topk_ids"][:]
        ids[int(f["row_offsets"][3]), 0] = 60_000  # stored as id + 1
        f["topk_ids"][:] = ids
    with caplog.at_level(logging.WARNING):
        check_all(cache, tokenizer, student)
    text = caplog.text
    assert "1 of 3 shards unusable" in text and "stale" in text
    assert "sequence 19: its stored bytes do not match their checksum" in text and "prepare_xtok" in text
    # Truncated (a dataset shorter than its offsets say) and missing files: reported, computed on the fly.
    with h5py.File(files[2], "r+") as f:
        f["input_ids"].resize((5,))
    files[0].unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_all(cache, tokenizer, student)
    assert "2 of 3 shards unusable" in caplog.text
    # A rerun rewrites exactly the unusable shards, the damaged-content one included (its window CRC fails).
    done = prepare_store(builder, cache, workers=1)
    assert done["shards_written"] == 3 and done["shards_kept"] == 0
    assert prepare_store(builder, cache, workers=1)["shards_written"] == 0
    done = prepare_store(builder, cache, workers=1, overwrite=True)
    assert done["shards_written"] == 3
    check_all(cache, tokenizer, student)


def test_no_usable_shard_means_on_the_fly(cache, tokenizer, student, monkeypatch):
    import distill.data.xtok.prepare as prepare

    builder = CrossTokenizerTargets(cache, tokenizer, student, use_store=False)
    calls = []

    def failing(task):
        calls.append(task)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(task)

    real = prepare._compute
    monkeypatch.setattr(prepare, "_compute", failing)
    with pytest.raises(RuntimeError):
        prepare_store(builder, cache, workers=1, batch=8)
    path = prepare.store_path(cache.cache_dir, builder.store_meta)
    assert (path / "meta.json").is_file() and not list(path.glob("shard-*")) and not list(path.glob(".*"))
    check_all(cache, tokenizer, student, expect_store=False)


def test_cli(cache, tokenizer_dir, corpus, tmp_path, capsys):
    student_dir = tmp_path / "student"
    trained_tokenizer(corpus, 400, split_digits=True).save_pretrained(student_dir)
    assert prepare_main([str(cache.cache_dir), "--student-tokenizer", str(student_dir), "--workers", "2"]) == 0
    assert "3 shards written (48 windows" in capsys.readouterr().out
    assert prepare_main([str(cache.cache_dir), "--student_tokenizer", str(student_dir)]) == 0
    assert "0 shards written" in capsys.readouterr().out
    stored = CrossTokenizerTargets(cache, None, str(student_dir))
    assert stored.store is not None
    compressed = [stored.fetch(cache, i) for i in range(len(cache))]
    stored.store.close()
    # --no-compression: plain arrays (more disk), read exactly as the compressed ones.
    assert prepare_main([str(cache.cache_dir), "--student-tokenizer", str(student_dir), "--overwrite",
                         "--no-compression"]) == 0
    assert "3 shards written" in capsys.readouterr().out
    plain = CrossTokenizerTargets(cache, None, str(student_dir))
    with h5py.File(plain.store.file_for(0), "r") as f:
        assert f["topk_logprobs"].compression is None
    for i, want in enumerate(compressed):
        assert_identical(plain.fetch(cache, i), want)
    assert prepare_main([str(tmp_path / "nowhere"), "--student-tokenizer", str(student_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


@pytest.mark.skipif(not (QWEN.is_dir() and SMOL.is_dir()), reason="../shared/tokenizers/{qwen3,smollm2} absent")
def test_real_qwen3_to_smollm2_store_is_bit_identical(tmp_path, corpus):
    from transformers import AutoTokenizer

    text = SHARED / "data" / "tinyshakespeare.txt"
    docs = text.read_text(encoding="utf-8")[:60_000].split("\n\n") if text.is_file() else corpus[:80]
    qwen, smol = AutoTokenizer.from_pretrained(str(QWEN)), AutoTokenizer.from_pretrained(str(SMOL))
    reader = TeacherCacheReader(write_text_cache(tmp_path / "cache", qwen, docs, max_length=256, top_k=64,
                                                 shard_size=12, max_sequences=30, name_or_path=str(QWEN)))
    builder = CrossTokenizerTargets(reader, qwen, smol, use_store=False)
    assert prepare_store(builder, reader, workers=2)["windows"] == len(reader) == 30
    check_all(reader, qwen, smol)
    assert schema.MANIFEST_NAME in {p.name for p in reader.cache_dir.iterdir()}


def test_trainer_data_reads_the_store_in_dataloader_workers(cache, tokenizer, student, monkeypatch):
    """`build_cache_data` (what the trainer calls) finds the store by itself; 2 forked DataLoader workers read it
    (HDF5 handles reopened per process) and collate to exactly the on-the-fly batches."""
    import torch
    from torch.utils.data import DataLoader

    from distill.data.dataset import DistillCollator, build_cache_data

    builder = CrossTokenizerTargets(cache, tokenizer, student, use_store=False)
    prepare_store(builder, cache, workers=1)
    data = build_cache_data(cache.cache_dir, student, len(student))
    assert data.train.target_builder.store is not None
    data.train.target_builder.store.survey()  # the parent touches the files before the fork
    collate = DistillCollator(student.pad_token_id)
    loader = DataLoader(data.train, batch_size=6, num_workers=2, collate_fn=collate, multiprocessing_context="fork")
    wants = [collate([builder(cache[i]) for i in range(start, min(start + 6, len(cache)))])
             for start in range(0, len(cache), 6)]
    # From here on no cache read may happen: the workers (forked after this) must get everything from the store.
    monkeypatch.setattr(TeacherCacheReader, "__getitem__", lambda self, i: pytest.fail(f"cache read of {i}"))
    batches = list(loader)
    assert len(batches) == len(wants)
    for batch, want in zip(batches, wants, strict=True):
        assert batch.keys() == want.keys()
        for key in want:
            assert batch[key].dtype == want[key].dtype and torch.equal(batch[key], want[key]), key
