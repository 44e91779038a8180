"""Compute a cache's cross-tokenizer targets once and write them to `CACHE/xtok/<key>/` (format: `store.py`).

CPU only. Windows are computed in a fork pool (`workers` processes, batches of `batch` windows, in order) and the
parent streams them into one HDF5 file per cache shard, written under a temp name and renamed when whole: an
interrupted run leaves finished shards usable and no partial file; a rerun skips shards that are already valid.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache_tools.format.fsutil import TMP_SUFFIX, atomic_path, atomic_write_text
from cache_tools.format.reader import TeacherCacheReader
from distill.data.xtok.pipeline import CrossTokenizerTargets
from distill.data.xtok.store import ARRAYS, COMPRESSION, TargetStore, compact, shard_attrs, store_path
from distill.data.xtok.store_check import CRC_FIELDS, DIGEST_ATTR, INDEX, alive, index_digest, pid_of_temp, sequence_crc


def _worker_init() -> None:
    """Forked workers stay out of OpenMP: libgomp cannot start a thread team in a child of a process that used one
    (the child hangs), and the work here is numpy anyway. They leave Ctrl-C to the parent (which ends the pool) and
    die quietly by SIGPIPE when the parent is gone (killed) instead of printing a BrokenPipeError traceback."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


_JOB: dict[str, Any] = {}  # the builder and reader, inherited by forked workers (never pickled)
# HDF5 chunk rows (compressed chunks are inflated whole): a 512-token window's slice touches ~5 chunks of 128 rows
# (K = 256) and one or two of the per-token arrays' chunks (CHUNK_ROWS * 32 tokens, a few windows).
CHUNK_ROWS = 128


def _compute(task: tuple[int, int, int]) -> tuple[int, list[dict[str, np.ndarray]]]:
    pos, start, stop = task
    builder, reader = _JOB["builder"], _JOB["reader"]
    parts = []
    for index in range(start, stop):
        seq = reader[index]
        part = compact(builder(seq), seq.pooled_hidden, builder.student_rows)
        part["seq_crc"] = np.array([sequence_crc(index, [part[name] for name in CRC_FIELDS])], dtype=np.uint32)
        parts.append(part)
    return pos, parts


class _ShardFile:
    """Appends `compact` parts to resizable chunked datasets; `close()` adds the offsets and attributes."""

    def __init__(self, path: Path, compress: bool = True) -> None:
        self.f = h5py.File(path, "w")
        self.filters = COMPRESSION if compress else {}
        self.lengths: dict[str, list[int]] = {"input_ids": [], "tail_logprob": [], "doc_lengths": []}
        self.crcs: list[np.ndarray] = []

    def append(self, parts: list[dict[str, np.ndarray]]) -> None:
        for name in ARRAYS:
            block = np.concatenate([p[name] for p in parts])
            if name not in self.f:
                self.f.create_dataset(name, shape=(0, *block.shape[1:]), maxshape=(None, *block.shape[1:]),
                                      dtype=block.dtype, chunks=(max(1, CHUNK_ROWS * (32 if block.ndim == 1 else 1)),
                                                                 *block.shape[1:]), **self.filters)
            ds = self.f[name]
            ds.resize(ds.shape[0] + block.shape[0], axis=0)
            ds[ds.shape[0] - block.shape[0]:] = block
        for key, lengths in self.lengths.items():
            lengths.extend(p[key].shape[0] for p in parts)
        self.crcs.extend(p["seq_crc"] for p in parts)

    def close(self, attrs: dict[str, Any]) -> None:
        index = [np.concatenate([[0], np.cumsum(self.lengths[key])]).astype(np.int64)
                 for key in ("input_ids", "tail_logprob", "doc_lengths")]
        index.append(np.concatenate(self.crcs).astype(np.uint32))
        for name, values in zip(INDEX, index, strict=True):
            self.f.create_dataset(name, data=values)
        for key, value in {**attrs, DIGEST_ATTR: index_digest(index)}.items():
            self.f.attrs[key] = value
        self.f.close()


def remove_dead_temp_files(path: Path) -> list[Path]:
    """Delete the temp files (`.NAME.<pid>.tmp`) that runs no longer alive (killed) left in `path`; a temp file of a
    run still going is kept."""
    removed = []
    for tmp in path.glob(f".*{TMP_SUFFIX}"):
        pid = pid_of_temp(tmp.name, TMP_SUFFIX)
        if pid is not None and pid != os.getpid() and alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def prepare_store(builder: CrossTokenizerTargets, reader: TeacherCacheReader, *, workers: int = 1,
                  overwrite: bool = False, batch: int = 16, compress: bool = True) -> dict[str, Any]:
    """Write the store for `builder`'s setup (its `store_meta`). Returns {"path", "shards_written",
    "shards_kept", "windows", "seconds", "bytes"}. Errors (a damaged sequence: CacheError) propagate. `compress`:
    the shards it writes get `store.COMPRESSION` (False: plain arrays, more disk, cheaper reads; both read alike)."""
    meta = builder.store_meta
    path = store_path(reader.cache_dir, meta)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    remove_dead_temp_files(path)
    store = TargetStore(path, meta, reader.manifest)
    # Every window's CRC is checked: a damaged shard is rebuilt, never kept because its structure looks right.
    todo = [pos for pos in range(len(store.shards)) if overwrite or store._problem(pos, contents=True) is not None]
    tasks = [(pos, start, min(start + batch, s.first_sequence + s.num_sequences))
             for pos in todo for s in [store.shards[pos]]
             for start in range(s.first_sequence, s.first_sequence + s.num_sequences, batch)]
    remaining = {pos: sum(1 for t in tasks if t[0] == pos) for pos in todo}
    started = time.perf_counter()
    _JOB.update(builder=builder, reader=reader)
    pool = (multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
            if workers > 1 and len(tasks) > 1 else None)
    try:
        results = pool.imap(_compute, tasks) if pool is not None else map(_compute, tasks)
        current: tuple[int, Any, _ShardFile] | None = None
        for pos, parts in results:
            if current is None:
                target = store.file_for(pos)
                context = atomic_path(target)
                current = (pos, context, _ShardFile(context.__enter__(), compress))
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
