"""Checksums of the cross-tokenizer store (`store.py`): a CRC-32 per window, bound to its global sequence index, and
a sha256 over each file's offsets and CRCs. The loader checks the CRC of every window it reads (a damaged window is
never returned), `prepare_xtok` checks every window of every file before keeping it, and a store of an older format
(which has no checksums) is named rather than read.

CRC-32 rather than a cryptographic hash: it guards against damage, not against an adversary, and runs at memory
speed on every read (`python -m bench --only loader` measures the check against the same reads without it)."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache_tools.format import schema

STAT_KEYS = ("student_tokens", "aligned", "teacher_mass", "mapped_mass", "exact_mass", "skipped", "truncated",
             "assistant_tokens", "assistant_aligned")
COUNT_KEYS = ("student_tokens", "aligned", "skipped", "truncated", "assistant_tokens", "assistant_aligned")
MASS_KEYS = ("teacher_mass", "mapped_mass", "exact_mass")
# What a window's CRC covers, in order: every array stored for it (per-token, per-aligned-row and per-window).
CRC_FIELDS = ("input_ids", "kd_mask", "label_mask", "topk_ids", "topk_logprobs", "tail_logprob", "doc_lengths",
              "pooled_hidden", "counts", "masses")
INDEX = ("seq_offsets", "row_offsets", "doc_offsets", "seq_crc")
# What each store format added over the one before (a store of an older format is named with what it lacks).
FORMAT_ADDS = {4: "per-window checksums", 5: "compressed arrays"}
DIGEST_ATTR = "index_sha256"


def sequence_crc(index: int, arrays: list[np.ndarray]) -> int:
    """CRC-32 of a window's stored arrays (in CRC_FIELDS order) seeded with its global index: a changed byte, or a
    window moved to another row, fails the check."""
    crc = zlib.crc32(np.int64(index).tobytes())
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).data, crc)
    return crc


def index_digest(index: list[np.ndarray]) -> str:
    """sha256 over the arrays of INDEX (in that order)."""
    digest = hashlib.sha256()
    for array in index:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def read_window(data: dict[str, Any], i: int, index: list[np.ndarray]) -> list[np.ndarray]:
    """Window i's stored arrays in CRC_FIELDS order, as stored (no conversion). `data` maps names to datasets (or to
    arrays already in memory); `index` holds the arrays of INDEX."""
    seq, rows, docs = index[0], index[1], index[2]
    t, a, d = slice(int(seq[i]), int(seq[i + 1])), slice(int(rows[i]), int(rows[i + 1])), \
        slice(int(docs[i]), int(docs[i + 1]))
    where = {"input_ids": t, "kd_mask": t, "label_mask": t, "topk_ids": a, "topk_logprobs": a, "tail_logprob": a,
             "doc_lengths": d, "pooled_hidden": i, "counts": i, "masses": i}
    return [data[name][where[name]] for name in CRC_FIELDS]


def index_problem(f: h5py.File, num_sequences: int) -> tuple[str | None, list[np.ndarray]]:
    """(why the offsets/CRCs cannot be trusted or None, the arrays of INDEX)."""
    missing = [name for name in INDEX if name not in f]
    if missing:
        return f"it lacks {missing[0]}", []
    index = [f[name][:] for name in INDEX]
    if any(a.shape != (num_sequences + 1,) for a in index[:3]) or index[3].shape != (num_sequences,):
        return "its offsets do not cover the shard's sequences", index
    if str(f.attrs.get(DIGEST_ATTR, "")) != index_digest(index):
        return f"its offsets or checksums do not match {DIGEST_ATTR} (damaged)", index
    return None, index


def content_problem(f: h5py.File, shard: schema.ShardInfo) -> str | None:
    """The first window whose stored bytes do not match its CRC (reads the whole file)."""
    problem, index = index_problem(f, shard.num_sequences)
    if problem:
        return problem
    data = {name: f[name] for name in CRC_FIELDS}
    for i in range(shard.num_sequences):
        if sequence_crc(shard.first_sequence + i, read_window(data, i, index)) != int(index[3][i]):
            return f"sequence {shard.first_sequence + i}: stored bytes do not match their checksum (damaged)"
    return None


def older_stores(store_dir: Path, meta: dict[str, Any], current: int) -> list[tuple[Path, int]]:
    """(folder, format) of stores of an older format for the same tokenizers and settings under `store_dir`."""
    same = ("teacher_hash", "student_hash", "rule", "max_length", "top_k")
    found = []
    for other in sorted(store_dir.glob("*/meta.json")):
        try:
            old = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(old, dict) and int(old.get("format", 0)) < current and all(old.get(k) == meta.get(k)
                                                                                  for k in same):
            found.append((other.parent, int(old.get("format", 0))))
    return found


def stats_from(counts: np.ndarray, masses: np.ndarray) -> dict[str, Any]:
    """The stats dict of `CrossTokenizerTargets.__call__`, same key order and Python types."""
    values: dict[str, Any] = {key: int(v) for key, v in zip(COUNT_KEYS, counts.tolist(), strict=True)}
    # A skipped window never ran the mapper: its masses stay the int 0 of the on-the-fly stats.
    values.update({key: (0 if values["skipped"] else float(v)) for key, v in zip(MASS_KEYS, masses.tolist(),
                                                                                 strict=True)})
    return {key: values[key] for key in STAT_KEYS}


def format_gap(old: int, current: int) -> str:
    """What a store of format `old` lacks against format `current`, e.g. "per-window checksums and compressed
    arrays"."""
    return " and ".join(FORMAT_ADDS[v] for v in range(old + 1, current + 1) if v in FORMAT_ADDS) or "nothing"


def one_line(err: BaseException) -> str:
    """An exception's message on one line (HDF5 errors can span several)."""
    return " ".join(str(err).split())


def pid_of_temp(name: str, suffix: str) -> int | None:
    """The writer's pid in a temp name `.NAME.<pid><suffix>`, or None."""
    pid = name[: -len(suffix)].rsplit(".", 1)[-1] if name.endswith(suffix) else ""
    return int(pid) if pid.isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
