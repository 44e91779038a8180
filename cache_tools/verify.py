"""`verify_cache`: check a finished cache end to end (manifest, checksums, layout, and the numbers themselves)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from cache_tools import schema

_ROWS_PER_READ = 64  # sequences checked at a time, so memory stays bounded on big shards


def _expected_layout(m: schema.CacheManifest, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    L, K = m.max_length, m.top_k
    P, H = len(m.pooling.get("layers", [])), int(m.pooling.get("hidden_size", 0))
    ids = schema.id_dtype_for(m.vocab_size)
    return {
        schema.INPUT_IDS: ((rows, L), ids),
        schema.VALID_LENGTH: ((rows,), np.dtype(np.int32)),
        schema.DOC_INDEX: ((rows,), np.dtype(np.int64)),
        schema.TEXT: ((rows,), None),
        schema.OFFSETS: ((rows, L, 2), np.dtype(schema.OFFSET_DTYPE)),
        schema.TOPK_IDS: ((rows, L, K), ids),
        schema.TOPK_LOGPROBS: ((rows, L, K), np.dtype(schema.LOGPROB_DTYPE)),
        schema.TAIL_LOGPROB: ((rows, L), np.dtype(schema.TAIL_DTYPE)),
        schema.POOLED_HIDDEN: ((rows, P, H), np.dtype(schema.POOLED_DTYPE)),
    }


def _check_rows(f: h5py.File, lo: int, hi: int, m: schema.CacheManifest) -> str | None:
    """Content checks on rows [lo, hi) of one shard; returns the first fault or None."""
    valid = f[schema.VALID_LENGTH][lo:hi]
    if (valid < 1).any() or (valid > m.max_length).any():
        return f"valid_length outside 1..{m.max_length}"
    positions = np.arange(m.max_length)[None, :] < valid[:, None]  # [n, L]
    ids = f[schema.TOPK_IDS][lo:hi][positions].astype(np.int64)  # [N, K] valid tokens only
    lp = f[schema.TOPK_LOGPROBS][lo:hi][positions].astype(np.float32)
    tail = f[schema.TAIL_LOGPROB][lo:hi][positions]
    input_ids = f[schema.INPUT_IDS][lo:hi][positions]
    if (input_ids >= m.vocab_size).any() or (ids >= m.vocab_size).any():
        return f"token ids >= vocab_size {m.vocab_size}"
    if not np.isfinite(lp).all() or not np.isfinite(tail).all():
        return "non-finite log-probs"
    if (lp > 0).any() or (tail > 0).any():
        return "log-probs > 0"
    if (tail < schema.TAIL_LOGPROB_FLOOR).any():
        return f"tail_logprob below the floor {schema.TAIL_LOGPROB_FLOOR}"
    if (np.diff(lp, axis=-1) > 0).any():
        return "top-k log-probs not sorted in descending order"
    if ids.shape[-1] > 1 and (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        return "duplicate ids within a top-k row"
    total = np.exp(lp.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
    if (np.abs(total - 1.0) > schema.PROB_SUM_EPS).any():
        worst = float(total[np.argmax(np.abs(total - 1.0))])
        return f"probabilities sum to {worst:.4f}, not 1 (+-{schema.PROB_SUM_EPS})"
    if not np.isfinite(f[schema.POOLED_HIDDEN][lo:hi].astype(np.float32)).all():
        return "non-finite pooled_hidden"
    return None


def verify_shard(cache_dir: Path, m: schema.CacheManifest, shard: schema.ShardInfo) -> list[str]:
    path = cache_dir / shard.file
    if not path.is_file():
        return [f"{shard.file}: missing"]
    size = path.stat().st_size
    if size != shard.bytes:
        return [f"{shard.file}: {size} bytes, manifest says {shard.bytes} (truncated or replaced); "
                "delete it and run build-cache --resume"]
    if schema.file_sha256(path) != shard.sha256:
        return [f"{shard.file}: sha256 mismatch (corrupted on disk); delete it and run build-cache --resume"]
    faults = []
    try:
        with h5py.File(path, "r") as f:
            for name, (shape, dtype) in _expected_layout(m, shard.num_sequences).items():
                if name not in f:
                    return [f"{shard.file}: dataset {name} missing"]
                ds = f[name]
                if ds.shape != shape:
                    faults.append(f"{shard.file}: {name} has shape {ds.shape}, expected {shape}")
                if dtype is not None and ds.dtype != dtype:
                    faults.append(f"{shard.file}: {name} has dtype {ds.dtype}, expected {dtype}")
            if int(f.attrs.get(schema.ATTR_FIRST_SEQUENCE, -1)) != shard.first_sequence:
                faults.append(f"{shard.file}: first_sequence attribute disagrees with the manifest")
            if faults:
                return faults
            if int(f[schema.VALID_LENGTH][:].sum()) != shard.num_tokens:
                faults.append(f"{shard.file}: token count disagrees with the manifest")
            for lo in range(0, shard.num_sequences, _ROWS_PER_READ):
                hi = min(shard.num_sequences, lo + _ROWS_PER_READ)
                fault = _check_rows(f, lo, hi, m)
                if fault:
                    first = shard.first_sequence
                    faults.append(f"{shard.file}: sequences {first + lo}..{first + hi - 1}: {fault}")
                    break
    except OSError as err:
        return [f"{shard.file}: unreadable HDF5 ({err})"]
    return faults


def verify_cache(cache_dir: str | Path) -> list[str]:
    """All faults found (empty list = sound). Each fault is one line naming the file."""
    cache_dir = Path(cache_dir)
    try:
        m = schema.load_manifest(cache_dir)
    except schema.CacheError as err:
        return [str(err)]
    faults = []
    if not m.complete:
        faults.append(f"{schema.MANIFEST_NAME}: cache is incomplete; finish it with `cache_tools build-cache --resume`")
    expected_first = 0
    for shard in sorted(m.shards, key=lambda s: s.first_sequence):
        if shard.first_sequence != expected_first:
            faults.append(f"{shard.file}: starts at sequence {shard.first_sequence}, expected {expected_first}; rerun "
                      "build-cache --resume to rebuild the manifest")
        expected_first = shard.first_sequence + shard.num_sequences
        # Every line names its fix; a shard's fault is repaired by rebuilding that shard.
        faults.extend(f if ";" in f else f"{f}; run build-cache --resume to rebuild it"
                      for f in verify_shard(cache_dir, m, shard))
    listed = {s.file for s in m.shards}
    for extra in sorted(p.name for p in cache_dir.glob(f"{schema.SHARD_PREFIX}*.h5") if p.name not in listed):
        faults.append(f"{extra}: not listed in the manifest (left by another build?); delete it or run build-cache "
                      "--resume, which discards it")
    if expected_first != m.num_sequences:
        faults.append(f"{schema.MANIFEST_NAME}: shards hold {expected_first} sequences, manifest says "
                      f"{m.num_sequences}; rerun build-cache --resume to rebuild the manifest")
    return faults
