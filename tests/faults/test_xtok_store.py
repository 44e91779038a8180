"""Faults of the cross-tokenizer store (`CACHE/xtok/<key>/shard-*.h5`, `python -m distill.prepare_xtok`): a store
damaged after it was written (a changed value, a compressed chunk HDF5 cannot inflate) is never used silently (the
loader warns in one line naming the file, the sequence and the fix, and computes those targets on the fly; a rerun
of prepare_xtok rebuilds exactly the damaged shard); an older store format is named with what it lacks; a killed
prepare_xtok leaves no traceback and its rerun removes its temp files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from xtok_fixtures import trained_tokenizer, write_text_cache

from cache_tools.format.fsutil import OFFLINE_ENV
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.text_data import pack_windows
from distill.data.xtok.pipeline import CrossTokenizerTargets
from distill.data.xtok.prepare import prepare_store

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, tokenizer, corpus):
    """48 windows in 3 shards of 16 (K = 16)."""
    windows = list(pack_windows(tokenizer, enumerate(corpus[:90]), 96))[:48]
    return TeacherCacheReader(write_text_cache(tmp_path / "cache", tokenizer, [], max_length=96, top_k=16,
                                               shard_size=16, windows=windows))


@pytest.fixture(scope="module")
def student(corpus):
    return trained_tokenizer(corpus, 400, split_digits=True)


def _nudge_logprob(f: h5py.File) -> int:
    """One top-k log-prob of sequence 19 made slightly smaller: still a valid distribution, so only a checksum can
    tell. Returns the damaged sequence."""
    row = int(f["row_offsets"][3])
    values = f["topk_logprobs"][row]
    values[-1] -= 0.25
    f["topk_logprobs"][row] = values
    return 19


def _swap_pooled(f: h5py.File) -> int:
    """Sequences 16 and 17 swap their pooled hidden states (each row intact, in the wrong place)."""
    pooled = f["pooled_hidden"][:2]
    f["pooled_hidden"][:2] = pooled[::-1]
    return 16


def _shift_offsets(f: h5py.File) -> int:
    """A token moved from one window to the next in the offsets (every array still the right size)."""
    seq = f["seq_offsets"][:]
    seq[3] -= 1
    f["seq_offsets"][:] = seq
    return 16


def _damage_compressed_chunk(path: Path) -> int:
    """Bytes in the middle of the first compressed chunk of topk_logprobs overwritten on disk (HDF5 cannot inflate
    it, or inflates it wrong): the window reading it first is sequence 16."""
    with h5py.File(path, "r") as f:
        ds = f["topk_logprobs"]
        assert ds.compression == "gzip", "the store is expected to be compressed"
        info = ds.id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes(16))
    return 16


def _in_file(damage):
    def apply(path: Path) -> int:
        with h5py.File(path, "r+") as f:
            return damage(f)
    return apply


DAMAGES = {"nudged_logprob": _in_file(_nudge_logprob), "swapped_rows": _in_file(_swap_pooled),
           "shifted_offsets": _in_file(_shift_offsets), "compressed_chunk": _damage_compressed_chunk}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_store_is_never_used_silently(damage, cache, tokenizer, student, caplog):
    fresh = CrossTokenizerTargets(cache, tokenizer, student, use_store=False)
    path = Path(prepare_store(fresh, cache, workers=1)["path"])
    shard = path / "shard-00001.h5"
    DAMAGES[damage](shard)
    with caplog.at_level(logging.WARNING):
        stored = CrossTokenizerTargets(cache, tokenizer, student)
        assert stored.store is not None  # the other two shards are used
        for i in range(len(cache)):
            got, want = stored.fetch(cache, i), fresh(cache[i])
            for key in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "pooled_hidden"):
                assert np.array_equal(got[key], want[key]), (i, key)  # damaged bytes never reach a batch
    said = [r.getMessage() for r in caplog.records if str(shard) in r.getMessage()]
    assert said and all("prepare_xtok" in m for m in said), caplog.text
    assert "damaged" in said[0] and "\n" not in said[0], said[0]
    # A rerun of prepare_xtok rebuilds the damaged shard (and only it); afterwards nothing is reported.
    done = prepare_store(fresh, cache, workers=1)
    assert done["shards_written"] == 1 and done["shards_kept"] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stored = CrossTokenizerTargets(cache, tokenizer, student)
        for i in range(len(cache)):
            assert np.array_equal(stored.fetch(cache, i)["topk_logprobs"], fresh(cache[i])["topk_logprobs"])
    assert str(path) not in caplog.text


def test_older_store_format_is_named_and_rebuilt(cache, tokenizer, student, caplog):
    import json

    from distill.data.xtok import store

    fresh = CrossTokenizerTargets(cache, tokenizer, student, use_store=False)
    path = Path(prepare_store(fresh, cache, workers=1)["path"])
    old = path.with_name("0123456789abcdef")  # what an older version wrote: another key, format 3 in meta.json
    path.rename(old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 3}))
    with caplog.at_level(logging.WARNING):
        assert CrossTokenizerTargets(cache, tokenizer, student).store is None
    assert str(old) in caplog.text and "format 3" in caplog.text, caplog.text
    assert "lacks per-window checksums and compressed arrays" in caplog.text, caplog.text
    assert store.STORE_FORMAT == 5
    assert prepare_store(fresh, cache, workers=1)["shards_written"] == 3
    assert CrossTokenizerTargets(cache, tokenizer, student).store is not None


@pytest.mark.faults_full
def test_killed_prepare_xtok_leaves_no_traceback_and_its_rerun_cleans_up(cache, student, tmp_path):
    """The parent is SIGKILLed as it renames its second shard (workers still computing): no traceback from the
    orphaned workers (stderr is read until every process holding it has exited), a temp file is left, and a rerun
    removes it and finishes the store."""
    student_dir = tmp_path / "student"
    student.save_pretrained(student_dir)
    argv = [sys.executable, "-m", "distill.prepare_xtok", str(cache.cache_dir), "--student-tokenizer",
            str(student_dir), "--workers", "2"]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(argv, cwd=REPO, env={**env, "DISTILL_FAULT": "write:shard-00001.h5"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "Traceback" not in killed.stderr and "BrokenPipe" not in killed.stderr, killed.stderr[-3000:]
    store_dir = next((cache.cache_dir / "xtok").iterdir())
    assert list(store_dir.glob(".shard-*.h5.*.tmp")), "the kill left no temp file (fault point missed?)"
    rerun = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".")], list(store_dir.iterdir())
    assert "2 shards written" in rerun.stdout and "1 already valid" in rerun.stdout, rerun.stdout
