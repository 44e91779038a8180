"""Same-size damage to a shard on the default training path: every shard's sha256 is checked before a process first
reads it (remembered by size + mtime + inode, in the process and in a record under DISTILL_VERIFIED_DIR), so a
changed byte stops training with one line naming the shard and the fix, although `--verify_cache` is off."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.format import schema, shard_check
from distill.data.dataset import build_cache_data

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tokenizer, corpus) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("checksums") / "cache", tokenizer, corpus, num_sequences=8,
                                 shard_size=4)


@pytest.fixture
def cache(tmp_path, clean) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    return out


def nudge_logprob(path: Path) -> None:
    """Flip the low byte of one stored fp16 top-k log-prob, in place: same size, still a finite negative log-prob
    (only a checksum can tell), read by the first sequence of the shard."""
    with h5py.File(path, "r") as f:
        ds = f[schema.TOPK_LOGPROBS]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
        assert ds.dtype == np.float16 and not ds.compression, "the fixture must store raw fp16 log-probs"
        before = float(ds[0, 0, 0])
    with open(path, "r+b") as raw:
        raw.seek(offset)
        byte = raw.read(1)
        raw.seek(offset)
        raw.write(bytes([byte[0] ^ 0x01]))
    with h5py.File(path, "r") as f:
        after = float(f[schema.TOPK_LOGPROBS][0, 0, 0])
    assert after != before and np.isfinite(after) and after <= 0, (before, after)


def test_damaged_shard_is_refused_before_it_is_read(cache, tokenizer):
    size = (cache / schema.shard_name(1)).stat().st_size
    nudge_logprob(cache / schema.shard_name(1))
    assert (cache / schema.shard_name(1)).stat().st_size == size
    data = build_cache_data(cache, tokenizer, len(tokenizer))
    data.train[0]  # shard 0 is intact
    with pytest.raises(schema.CacheError) as info:
        data.train[4]
    line = str(info.value)
    assert "\n" not in line and schema.shard_name(1) in line and "sha256" in line and "--resume" in line, line


def test_verified_shards_are_not_hashed_again(cache, tokenizer, monkeypatch):
    """The first reader hashes each shard once; a second reader (a DataLoader worker of the next epoch, another
    run) finds the record; a shard written since (new mtime) is hashed again and refused."""
    hashed = []
    real = shard_check.file_sha256
    monkeypatch.setattr(shard_check, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    for _ in range(2):
        data = build_cache_data(cache, tokenizer, len(tokenizer))
        for i in range(len(data.train)):
            data.train[i]
            data.train[i]
    assert sorted(hashed) == [schema.shard_name(0), schema.shard_name(1)], hashed
    # HDF5 shares a file opened twice in one process: with the reader's datasets still open, the nudge's own check
    # would read their cached chunks. The reader below reopens the shard, and its checksum record refuses it.
    data.reader.close()
    nudge_logprob(cache / schema.shard_name(0))
    with pytest.raises(schema.CacheError, match=schema.shard_name(0)):
        data.train[0]


@pytest.mark.faults_full
def test_training_stops_on_a_damaged_shard_by_default(cache, tmp_path, student_dir):
    from faults.test_training_faults import _argv, _assert_one_line_error, _run

    nudge_logprob(cache / schema.shard_name(1))
    out = tmp_path / "out"
    proc = _run(_argv(student_dir, cache, out, "--max_steps", 4))
    _assert_one_line_error(proc, schema.shard_name(1), "sha256", "build-cache --resume")
    assert not (out / "student").exists()
