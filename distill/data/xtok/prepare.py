"""Compute a cache's cross-tokenizer targets once and write them to `CACHE/xtok/<key>/` (format: `store.py`).

CPU only. Windows are computed in a fork pool (`workers` processes, batches of `batch` windows, in order) and the
parent streams them into one HDF5 file per cache shard, written under a temp name and renamed when whole: an
interrupted run leaves finished shards usable and no partial file; a rerun skips shards that are already valid.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache_tools.format.fsutil import atomic_path, atomic_write_text
from cache_tools.format.reader import TeacherCacheReader
from distill.data.xtok.pipeline import CrossTokenizerTargets
from distill.data.xtok.store import ARRAYS, TargetStore, compact, shard_attrs, store_path


def _one_thread() -> None:
    """Forked workers stay out of OpenMP: libgomp cannot start a thread team in a child of a process that used one
    (the child hangs), and the work here is numpy anyway."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


_JOB: dict[str, Any] = {}  # the builder and reader, inherited by forked workers (never pickled)
CHUNK_ROWS = 128  # HDF5 chunk rows: a 512-token window's slice touches ~5 chunks of 128 KB (K = 256, float32)


def _compute(task: tuple[int, int, int]) -> tuple[int, list[dict[str, np.ndarray]]]:
    pos, start, stop = task
    builder, reader = _JOB["builder"], _JOB["reader"]
    parts = []
    for index in range(start, stop):
        seq = reader[index]
        parts.append(compact(builder(seq), seq.pooled_hidden, builder.student_rows))
    return pos, parts


class _ShardFile:
    """Appends `compact` parts to resizable chunked datasets; `close()` adds the offsets and attributes."""

    def __init__(self, path: Path) -> None:
        self.f = h5py.File(path, "w")
        self.lengths: dict[str, list[int]] = {"input_ids": [], "tail_logprob": [], "doc_lengths": []}

    def append(self, parts: list[dict[str, np.ndarray]]) -> None:
        for name in ARRAYS:
            block = np.concatenate([p[name] for p in parts])
            if name not in self.f:
                self.f.create_dataset(name, shape=(0, *block.shape[1:]), maxshape=(None, *block.shape[1:]),
                                      dtype=block.dtype, chunks=(max(1, CHUNK_ROWS * (256 if block.ndim == 1 else 1)),
                                                                 *block.shape[1:]))
            ds = self.f[name]
            ds.resize(ds.shape[0] + block.shape[0], axis=0)
            ds[ds.shape[0] - block.shape[0]:] = block
        for key, lengths in self.lengths.items():
            lengths.extend(p[key].shape[0] for p in parts)

    def close(self, attrs: dict[str, Any]) -> None:
        offsets = (("seq_offsets", "input_ids"), ("row_offsets", "tail_logprob"), ("doc_offsets", "doc_lengths"))
        for name, key in offsets:
            self.f.create_dataset(name, data=np.concatenate([[0], np.cumsum(self.lengths[key])]).astype(np.int64))
        for key, value in attrs.items():
            self.f.attrs[key] = value
        self.f.close()


def prepare_store(builder: CrossTokenizerTargets, reader: TeacherCacheReader, *, workers: int = 1,
                  overwrite: bool = False, batch: int = 16) -> dict[str, Any]:
    """Write the store for `builder`'s setup (its `store_meta`). Returns {"path", "shards_written",
    "shards_kept", "windows", "seconds", "bytes"}. Errors (a damaged sequence: CacheError) propagate."""
    meta = builder.store_meta
    path = store_path(reader.cache_dir, meta)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    store = TargetStore(path, meta, reader.manifest)
    todo = [pos for pos in range(len(store.shards)) if overwrite or store._problem(pos) is not None]
    tasks = [(pos, start, min(start + batch, s.first_sequence + s.num_sequences))
             for pos in todo for s in [store.shards[pos]]
             for start in range(s.first_sequence, s.first_sequence + s.num_sequences, batch)]
    remaining = {pos: sum(1 for t in tasks if t[0] == pos) for pos in todo}
    started = time.perf_counter()
    _JOB.update(builder=builder, reader=reader)
    pool = (multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread)
            if workers > 1 and len(tasks) > 1 else None)
    try:
        results = pool.imap(_compute, tasks) if pool is not None else map(_compute, tasks)
        current: tuple[int, Any, _ShardFile] | None = None
        for pos, parts in results:
            if current is None:
                target = store.file_for(pos)
                context = atomic_path(target)
                current = (pos, context, _ShardFile(context.__enter__()))
            current[2].append(parts)
            remaining[pos] -= 1
            if remaining[pos] == 0:  # ordered results: this shard is whole; rename it into place
                current[2].close(shard_attrs(meta, store.shards[pos]))
                current[1].__exit__(None, None, None)
                current = None
    except BaseException as err:
        if current is not None:
            current[2].f.close()
            current[1].__exit__(type(err), err, err.__traceback__)
        raise
    finally:
        if pool is not None:
            pool.terminate()
        _JOB.clear()
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    windows = sum(store.shards[pos].num_sequences for pos in todo)
    return {"path": str(path), "shards_written": len(todo), "shards_kept": len(store.shards) - len(todo),
            "windows": windows, "seconds": time.perf_counter() - started, "bytes": size}
