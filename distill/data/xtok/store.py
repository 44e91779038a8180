"""Precomputed cross-tokenizer targets, stored beside the cache: `CACHE/xtok/<key>/<cache shard name>`.

Computing a window's student targets costs real CPU time (re-tokenise, align, map and merge 256 teacher ids per
row); reading them back costs a slice per array. `python -m distill.prepare_xtok` computes them once per (cache,
student tokenizer, rule, max_length, code) and `CrossTokenizerTargets.fetch` reads them, so DataLoader workers only
read arrays. The dict a read returns is bit-identical to `CrossTokenizerTargets.__call__` on the same sequence.

One HDF5 file per cache shard (S sequences, T student tokens, A aligned positions, K slots), flattened with offsets:
    seq_offsets [S+1] int64, row_offsets [S+1] int64   token / aligned-row offsets of each sequence
    input_ids [T] int32, kd_mask [T] bool               student ids; which positions hold a KD target
    topk_ids [A, K] uint16 or int32 (student id + 1: 0 = empty slot; uint16 when the student vocabulary allows),
    topk_logprobs [A, K] float32, tail_logprob [A] float32   aligned rows only (the others are all -1 / 0 / 0)
    counts [S, 4] int64 (COUNT_KEYS), masses [S, 3] float64 (MASS_KEYS), pooled_hidden [S, P, H] (the cache's dtype)
    label_mask [T] bool (all True unless the key is assistant-only), doc_offsets [S+1] int64 + doc_lengths [D] int32
    (student tokens per packed document: one per window unless the key is isolated)
    seq_crc [S] uint32 (CRC-32 of each window's stored bytes and global index: `store_check`)
The per-token and per-row arrays are chunked and compressed by HDF5 (`COMPRESSION`: byte shuffle + gzip, read by any
h5py); a chunk HDF5 cannot inflate is a damaged window like one failing its CRC.
Attributes name the key and the cache shard (file, sha256, counts) it was computed from; `index_sha256` covers the
offsets and CRCs. Files are written to a temp name and renamed, so a file is whole or absent; a file whose key,
source shard, sizes or index checksum do not match is never read, and a window whose bytes fail its CRC is never
returned (the loader computes that shard on the fly and warns; `prepare_xtok` rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache_tools.format import schema
from cache_tools.format.fsutil import file_sha256
from distill.data.xtok.store_check import (  # noqa: F401 - the stats keys are re-exported: part of the format
    COUNT_KEYS,
    CRC_FIELDS,
    MASS_KEYS,
    STAT_KEYS,
    content_problem,
    format_gap,
    index_problem,
    older_stores,
    one_line,
    read_window,
    sequence_crc,
    stats_from,
)

log = logging.getLogger(__name__)

STORE_DIR = schema.XTOK_STORE_DIR
STORE_FORMAT = 5  # what each format adds: store_check.FORMAT_ADDS
# HDF5's own filters (readable without a plugin); level 4: higher levels cost the writing parent far more CPU.
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
ARRAYS = ("input_ids", "kd_mask", "topk_ids", "topk_logprobs", "tail_logprob", "counts", "masses", "pooled_hidden",
          "label_mask", "doc_lengths")
_CODE = ("pipeline.py", "align.py", "topk_map.py", "vocab_map.py", "token_bytes.py", "store.py", "documents.py",
         "chat.py", "chat_targets.py", "store_check.py")


def code_fingerprint() -> str:
    """16 hex digits over the source of every module that decides the targets (and of this file format) plus the
    `tokenizers` and numpy versions: stored targets computed by other code are recomputed, never reused."""
    import tokenizers

    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _CODE:
        digest.update(file_sha256(here / name).encode())
    digest.update(f"{tokenizers.__version__} {np.__version__} {STORE_FORMAT}".encode())
    return digest.hexdigest()[:16]


def store_key(teacher_hash: str, student_hash: str, rule: str, max_length: int | None, top_k: int, *,
              isolated: bool = False, assistant_only: bool = False, chat_template: str = "") -> dict[str, Any]:
    """Everything the stored targets depend on, as a dict (written to `meta.json`); `key_name(meta)` names it.
    `chat_template`: the student's template for conversational caches (its hash is kept)."""
    return {"format": STORE_FORMAT, "teacher_hash": teacher_hash, "student_hash": student_hash, "rule": rule,
            "max_length": int(max_length or 0), "top_k": int(top_k), "isolated": bool(isolated),
            "assistant_only": bool(assistant_only),
            "chat_template": hashlib.sha256(chat_template.encode()).hexdigest()[:16] if chat_template else "",
            "code": code_fingerprint()}


def key_name(meta: dict[str, Any]) -> str:
    return schema.stable_hash(meta)[:16]


def store_path(cache_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    return Path(cache_dir) / STORE_DIR / key_name(meta)


def id_dtype(student_rows: int) -> np.dtype:
    """Stored student ids are id + 1 (0 = empty slot): 2 bytes per slot for vocabularies under 65,535 rows."""
    return np.dtype(np.uint16) if student_rows < 2**16 - 1 else np.dtype(np.int32)


def compact(out: dict[str, Any], pooled: np.ndarray, student_rows: int) -> dict[str, np.ndarray]:
    """One window's `CrossTokenizerTargets` output -> the arrays stored for it (aligned rows only, ids + 1).
    `pooled`: the cache's pooled hidden states in their stored dtype (so the float32 cast on read is the same)."""
    aligned = np.flatnonzero(out["kd_mask"])
    stats = out["stats"]
    n = out["input_ids"].shape[0]
    return {
        "label_mask": out.get("label_mask", np.ones(n, dtype=np.bool_)),
        "doc_lengths": np.asarray(out.get("segment_lengths", [n] if n else []), dtype=np.int32),
        "input_ids": out["input_ids"].astype(np.int32),
        "kd_mask": out["kd_mask"],
        "topk_ids": (out["topk_ids"][aligned] + 1).astype(id_dtype(student_rows)),
        "topk_logprobs": out["topk_logprobs"][aligned],
        "tail_logprob": out["tail_logprob"][aligned],
        "counts": np.array([[stats[k] for k in COUNT_KEYS]], dtype=np.int64),
        "masses": np.array([[stats[k] for k in MASS_KEYS]], dtype=np.float64),
        "pooled_hidden": pooled[None],
    }


def shard_attrs(meta: dict[str, Any], shard: schema.ShardInfo) -> dict[str, Any]:
    return {"key": key_name(meta), "meta": json.dumps(meta, sort_keys=True), "cache_shard": shard.file,
            "cache_shard_sha256": shard.sha256, "first_sequence": shard.first_sequence,
            "num_sequences": shard.num_sequences}


def shard_problem(f: h5py.File, meta: dict[str, Any], shard: schema.ShardInfo) -> str | None:
    """Why this stored shard must not be used (stale key, other source shard, inconsistent sizes), or None."""
    want = shard_attrs(meta, shard)
    for key in ("key", "cache_shard_sha256", "first_sequence", "num_sequences"):
        if key not in f.attrs or str(f.attrs[key]) != str(want[key]):
            return f"its {key} does not match the cache / tokenizers / code (stale)"
    S, K = shard.num_sequences, meta["top_k"]
    missing = [n for n in ARRAYS if n not in f]
    if missing:
        return f"it lacks {missing[0]}"
    problem, (seq, rows, docs, _) = index_problem(f, S)
    if problem:
        return problem
    T, A = int(seq[-1]), int(rows[-1])
    shapes = {"input_ids": (T,), "kd_mask": (T,), "label_mask": (T,), "doc_lengths": (int(docs[-1]),),
              "topk_ids": (A, K), "topk_logprobs": (A, K),
              "tail_logprob": (A,), "counts": (S, len(COUNT_KEYS)), "masses": (S, len(MASS_KEYS))}
    for name, shape in shapes.items():
        if f[name].shape != shape:
            return f"{name} has shape {f[name].shape}, expected {shape} (truncated or damaged)"
    if f["pooled_hidden"].shape[0] != S:
        return "pooled_hidden does not cover the shard's sequences"
    return None


class TargetStore:
    """Read side: `get(index)` -> the per-example dict for global sequence `index`, or None when its shard has no
    usable stored file (the caller computes it on the fly). Fork/pickle-safe like the cache reader: HDF5 handles
    are opened lazily per process. `check(out)` (e.g. `validation.check_mapped`) guards each read window."""

    def __init__(self, path: Path, meta: dict[str, Any], manifest: schema.CacheManifest, check: Any = None) -> None:
        self.path = Path(path)
        self.meta = meta
        self.shards = sorted(manifest.shards, key=lambda s: s.first_sequence)
        self._starts = np.array([s.first_sequence for s in self.shards], dtype=np.int64)
        self.check = check
        self._open: dict[int, Any] = {}  # shard pos -> (h5py.File, datasets, offsets + CRCs) or None (unusable)
        self._pid = os.getpid()
        self.checksums = True  # every window read is checked against its CRC (False only to measure that check)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def close(self) -> None:
        if self._pid == os.getpid():
            for entry in self._open.values():
                if entry is not None:
                    entry[0].close()
        self._open = {}

    def file_for(self, pos: int) -> Path:
        return self.path / self.shards[pos].file

    def survey(self) -> tuple[int, list[str]]:
        """(usable shards, one line per unusable one), opening each file once in this process then closing it."""
        problems = []
        for pos in range(len(self.shards)):
            problem = self._problem(pos)
            if problem:
                problems.append(f"{self.file_for(pos)}: {problem}")
        return len(self.shards) - len(problems), problems

    def _problem(self, pos: int, contents: bool = False) -> str | None:
        """Why shard `pos` cannot be used (None: usable); `contents` also checks every window's CRC."""
        path = self.file_for(pos)
        if not path.is_file():
            return "absent"
        try:
            with h5py.File(path, "r") as f:
                problem = shard_problem(f, self.meta, self.shards[pos])
                return problem or (content_problem(f, self.shards[pos]) if contents else None)
        except OSError as err:
            return f"unreadable ({err})"

    def _shard(self, pos: int) -> Any:
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if pos not in self._open:
            entry = None
            path = self.file_for(pos)
            try:
                f = h5py.File(path, "r") if path.is_file() else None
                problem = "absent" if f is None else shard_problem(f, self.meta, self.shards[pos])
                if problem is None:
                    # Dataset objects are looked up once: a lookup costs about as much as a small read.
                    data = {name: f[name] for name in ARRAYS} | {"counts": f["counts"][:], "masses": f["masses"][:]}
                    entry = (f, data, index_problem(f, self.shards[pos].num_sequences)[1])
                elif f is not None:
                    f.close()
            except OSError as err:
                problem = f"unreadable ({err})"
            if entry is None and problem != "absent":
                log.warning("%s: %s; computing its cross-tokenizer targets on the fly (rerun `python -m "
                            "distill.prepare_xtok` to rebuild it)", path, problem)
            self._open[pos] = entry
        return self._open[pos]

    def get(self, index: int) -> dict[str, Any] | None:
        pos = int(np.searchsorted(self._starts, index, side="right")) - 1
        entry = self._shard(pos)
        if entry is None:
            return None
        f, data, stored_index = entry
        i = index - self.shards[pos].first_sequence
        try:
            raw = dict(zip(CRC_FIELDS, read_window(data, i, stored_index), strict=True))
        except OSError as err:  # HDF5 could not inflate a compressed chunk of this window
            return self._drop(pos, index, f"a compressed chunk cannot be inflated ({one_line(err)})")
        problem = None
        if self.checksums and sequence_crc(index, list(raw.values())) != int(stored_index[3][i]):
            problem = "its stored bytes do not match their checksum"
        n, K = raw["input_ids"].shape[0], self.meta["top_k"]
        kd_mask = raw["kd_mask"]
        aligned = np.flatnonzero(kd_mask)
        out = {
            "input_ids": raw["input_ids"].astype(np.int64),
            "topk_ids": np.full((n, K), -1, dtype=np.int64),
            "topk_logprobs": np.zeros((n, K), dtype=np.float32),
            "tail_logprob": np.zeros(n, dtype=np.float32),
            "kd_mask": kd_mask,
            "pooled_hidden": raw["pooled_hidden"].astype(np.float32),
        }
        if problem is None and aligned.shape[0] != raw["tail_logprob"].shape[0]:
            problem = "kd_mask disagrees with the stored rows"
        if problem is None and aligned.shape[0]:
            ids = raw["topk_ids"].astype(np.int64)
            ids -= 1
            out["topk_ids"][aligned] = ids
            out["topk_logprobs"][aligned] = raw["topk_logprobs"]
            out["tail_logprob"][aligned] = raw["tail_logprob"]
        problem = problem or (self.check(out) if self.check is not None else None)
        if problem is not None:
            return self._drop(pos, index, problem)
        if self.meta.get("assistant_only"):
            out["label_mask"] = raw["label_mask"]
        if self.meta.get("isolated"):
            out["segment_lengths"] = raw["doc_lengths"]
        out["stats"] = stats_from(raw["counts"], raw["masses"])
        return out

    def _drop(self, pos: int, index: int, problem: str) -> None:
        """Window `index` of shard `pos` is damaged: say so once, stop using the shard (computed on the fly)."""
        log.warning("%s: sequence %d: %s: the stored file is damaged; computing this shard's cross-tokenizer targets "
                    "on the fly (rerun `python -m distill.prepare_xtok`: it rebuilds damaged shards)",
                    self.file_for(pos), index, problem)
        self._open[pos][0].close()
        self._open[pos] = None


def open_store(cache_dir: str | os.PathLike, manifest: schema.CacheManifest, meta: dict[str, Any], check: Any,
               hint: str) -> TargetStore | None:
    """The store for `meta` when it holds at least one usable shard (warning about the others), else None with a
    one-line hint to build it."""
    path = store_path(cache_dir, meta)
    if not path.is_dir():
        older = older_stores(path.parent, meta, STORE_FORMAT)
        if older:
            log.warning("%s: a store of format %d for these tokenizers lacks %s (format %d), so it is not used; "
                        "computing on the fly; rebuild it with `%s`", older[0][0], older[0][1],
                        format_gap(older[0][1], STORE_FORMAT), STORE_FORMAT, hint)
        else:
            log.warning("cross-tokenizer targets are computed on the fly (~20 ms of CPU per window); precompute them "
                        "once with `%s`", hint)
        return None
    store = TargetStore(path, meta, manifest, check)
    usable, problems = store.survey()
    if problems:
        log.warning("%s: %d of %d shards unusable (first: %s); those are computed on the fly; rerun `%s`", path,
                    len(problems), len(store.shards), problems[0], hint)
    if not usable:
        return None
    log.info("cross-tokenizer targets read from %s (%d/%d shards precomputed)", path, usable, len(store.shards))
    return store
