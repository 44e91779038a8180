"""Cheap per-sequence checks of what the loader hands to the loss, on both target paths.

A shard can be damaged in ways that keep its size and HDF5 structure (flipped bits in ids or log-probs): the loss
would then index past the LM head, or train on NaN, silently. Each check here is one or two vectorised reductions
(min / max) per array, a few hundred microseconds for a 512 x 256 window, so it runs on every sequence a
DataLoader worker reads. On failure: `CacheError`, one line naming the shard file, the global sequence index and the
fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema
from cache_tools.format.reader import CachedSequence, CachedTargets, TeacherCacheReader


def is_sampled(manifest: schema.CacheManifest) -> bool:
    """Sampled targets (format v2: distinct sampled ids, log(count/N), tail -inf) rather than top-k."""
    return manifest.targets.kind == "sampled"


class SequenceValidator:
    """Callable `CachedSequence -> None` (raises CacheError) for one cache; picklable (plain data only).

    Checks: input ids in [0, V); teacher top-k ids in [-1, V) (-1 = empty slot); log-probs finite and <= 0; tail
    finite and <= 0 (-inf allowed for sampled caches: their support carries all the mass); pooled hidden finite.
    V is the cache's vocabulary (`manifest.vocab_size`, the teacher head's rows).
    """

    def __init__(self, reader: TeacherCacheReader | schema.CacheManifest, cache_dir: str | Path | None = None) -> None:
        manifest = reader.manifest if isinstance(reader, TeacherCacheReader) else reader
        where = reader.cache_dir if isinstance(reader, TeacherCacheReader) else cache_dir
        self.cache_dir = Path(where) if where is not None else Path("<cache>")
        self.vocab_size = int(manifest.vocab_size)
        self.sampled = is_sampled(manifest)
        shards = sorted(manifest.shards, key=lambda s: s.first_sequence)
        self._starts = [s.first_sequence for s in shards]
        self._files = [s.file for s in shards]

    def __call__(self, seq: CachedSequence | CachedTargets) -> None:
        if isinstance(seq, CachedTargets):  # targets read without their window (another cache holds it)
            problem = targets_problem(seq, self.vocab_size, self.sampled) or masks_problem(seq)
        else:
            problem = sequence_problem(seq, self.vocab_size, self.sampled)
        if problem:
            self.fail(seq.index, problem)

    def fail(self, index: int, problem: str) -> None:
        """Raise the one-line CacheError for sequence `index`."""
        pos = max(int(np.searchsorted(self._starts, index, side="right")) - 1, 0)
        shard = self.cache_dir / self._files[pos] if self._files else self.cache_dir
        raise schema.CacheError(
            f"{shard}: sequence {index} {problem}; the shard is damaged: run `cache_tools verify {self.cache_dir}`, "
            "then rebuild it with `cache_tools build-cache ... --resume`"
        )


def sequence_problem(seq: CachedSequence, vocab_size: int, sampled: bool) -> str | None:
    """What is wrong with `seq` (a short phrase) or None. Shapes: input_ids [n], topk_ids / topk_logprobs [n, K],
    tail_logprob [n], pooled_hidden [P, H]."""
    if seq.length == 0:
        return None
    if not _in_range(seq.input_ids, 0, vocab_size):
        return f"holds input ids outside [0, {vocab_size})"
    problem = targets_problem(seq, vocab_size, sampled)
    if problem:
        return problem
    pooled = seq.pooled_hidden.astype(np.float32, copy=False)
    if pooled.size and not np.isfinite(pooled.max() - pooled.min()):
        return "holds NaN/Inf pooled hidden states"
    return masks_problem(seq)


def targets_problem(seq: CachedSequence | CachedTargets, vocab_size: int, sampled: bool) -> str | None:
    """The teacher targets' part of `sequence_problem`: ids in [-1, V), log-probs finite and <= 0, tail <= 0."""
    if not _in_range(seq.topk_ids, -1, vocab_size):
        return f"holds teacher ids outside [0, {vocab_size})"
    if not _logprobs_ok(seq.topk_logprobs, finite=True):
        return "holds NaN/Inf or positive teacher log-probs"
    if not _logprobs_ok(seq.tail_logprob, finite=not sampled):
        return "holds a NaN/Inf or positive tail log-prob" if not sampled else "holds a NaN or positive tail"
    return None


def masks_problem(seq: CachedSequence | CachedTargets) -> str | None:
    """Format 3 per-token records: document pieces tiling the window, masks of the window's length."""
    n = seq.length
    lengths = getattr(seq, "segment_lengths", None)
    if lengths is not None and (len(lengths) == 0 or int(np.min(lengths)) <= 0 or int(np.sum(lengths)) != n):
        return f"has segment lengths that do not tile its {n} tokens"
    for name in ("assistant_mask", "target_mask"):
        mask = getattr(seq, name, None)
        if mask is not None and np.shape(mask) != (n,):
            return f"has a {name} of shape {np.shape(mask)}, expected ({n},)"
    return None


def check_mapped(out: dict[str, Any], student_rows: int) -> str | None:
    """Cross-tokenizer output: student ids in [-1, student_rows) (a damaged vocabulary map file would break this) and
    no NaN in log-probs or tail (the inputs were checked already; this guards the mapping itself)."""
    ids = out["topk_ids"]
    if ids.size and not _in_range(ids, -1, student_rows):
        return f"maps to student ids outside [0, {student_rows}) (delete the cache's vocab_maps/ folder)"
    for name in ("topk_logprobs", "tail_logprob"):
        if out[name].size and np.isnan(out[name].max()):
            return f"maps to NaN {name}"
    return None


def _in_range(values: np.ndarray, low: int, high: int) -> bool:
    return values.size == 0 or (int(values.min()) >= low and int(values.max()) < high)


def _logprobs_ok(values: np.ndarray, *, finite: bool) -> bool:
    """All <= 0 (a NaN makes max() NaN, which fails the comparison) and, if `finite`, none -inf."""
    if values.size == 0:
        return True
    if values.dtype == np.float16:  # numpy reduces fp16 element by element; one SIMD cast makes it ~4x cheaper
        values = values.astype(np.float32)
    high = values.max()
    if not high <= 0:
        return False
    return not finite or bool(values.min() > -np.inf)
