"""Reference copy of the cross-tokenizer targets as they were before the vectorised rewrite (commit f265a7a:
topk_map.py and `CrossTokenizerTargets.__call__`), kept verbatim so a test can demand
bit-identical outputs from the fast path. Not part of the library; do not optimise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_tools.reader import CachedSequence

# Alignment is imported, not copied: distill/data/xtok/align.py is unchanged since f265a7a (only the mapping was
# rewritten), so the reference below keeps a verbatim copy of the mapping alone.
from distill.data.xtok.align import (  # noqa: F401 - the reference pipeline uses these names
    Consumed,
    StudentWindow,
    _is_continuation,
    _last_of_equal_runs,
    _squash,
    align,
    char_to_byte_table,
    consumed_ends,
    encode_student,
    split_segments,
    student_consumed,
)

STAT_KEYS = ("student_tokens", "aligned", "teacher_mass", "mapped_mass", "exact_mass", "skipped", "truncated")

@dataclass
class MappedTopK:
    """ids: int64 [m, K] student ids, unique per row, sorted by probability descending, -1 padding at the end;
    logprobs: float32 [m, K] (0 in empty slots); tail: float32 [m]; mass sums over the m rows (for coverage)."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    teacher_mass: float
    mapped_mass: float
    exact_mass: float


def map_topk(teacher_ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, map_ids: np.ndarray,
             exact: np.ndarray) -> MappedTopK:
    """Map teacher rows [m, K] through `map_ids` [V_teacher] (ids past its end, e.g. padded head rows, are unmapped).

    Probabilities landing on the same student id are summed (log of the sum); unmapped mass joins the tail:
    tail' = log(exp(tail) + unmapped). Rows without merges or unmapped entries keep their values bit for bit, so the
    same tokenizer through this path gives exactly the direct path's targets.
    """
    m, k = teacher_ids.shape
    lp = logprobs.astype(np.float32)
    in_range = (teacher_ids >= 0) & (teacher_ids < map_ids.shape[0])
    safe = np.where(in_range, teacher_ids, 0)
    ids = np.where(in_range, map_ids[safe], -1)
    is_exact = in_range & exact[safe] & (ids >= 0)
    p = np.exp(lp.astype(np.float64))
    unmapped = ids < 0
    teacher_mass = float(p.sum())
    exact_mass = float(p[is_exact].sum())

    # Duplicates within a row: sort ids (stable, so the first of a group is its highest-probability member).
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    dup_sorted = np.zeros_like(sorted_ids, dtype=bool)
    dup_sorted[:, 1:] = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    has_dup = bool(dup_sorted.any())
    if has_dup:
        sorted_p = np.take_along_axis(np.where(unmapped, 0.0, p), order, axis=1)
        flat_p = sorted_p.ravel()
        starts = np.flatnonzero(~dup_sorted.ravel())
        group_sum = np.add.reduceat(flat_p, starts)
        merged_sorted = np.zeros(m * k, dtype=np.float64)
        merged_sorted[starts] = group_sum
        merged = np.empty((m, k), dtype=np.float64)
        np.put_along_axis(merged, order, merged_sorted.reshape(m, k), axis=1)
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        grown = (merged != p) & ~dup & ~unmapped
        lp = np.where(grown, np.log(np.maximum(merged, 1e-300)), lp).astype(np.float32)
        empty = unmapped | dup
    else:
        merged = p
        empty = unmapped
    ids = np.where(empty, -1, ids)
    lp = np.where(empty, 0.0, lp).astype(np.float32)

    # Unmapped mass joins the tail; rows without any keep their stored tail exactly.
    lost = np.where(unmapped, p, 0.0).sum(axis=1)
    new_tail = tail.astype(np.float32)
    rows = lost > 0
    if rows.any():
        new_tail = new_tail.copy()
        new_tail[rows] = np.log(np.exp(tail[rows].astype(np.float64)) + lost[rows]).astype(np.float32)

    if has_dup or empty.any():
        # Re-sort by probability, empty slots last; stable so ties keep the teacher's order.
        key = np.where(empty, -1.0, merged)
        resort = np.argsort(-key, axis=1, kind="stable")
        ids = np.take_along_axis(ids, resort, axis=1)
        lp = np.take_along_axis(lp, resort, axis=1)
    mapped_mass = teacher_mass - float(lost.sum())
    return MappedTopK(ids.astype(np.int64), lp, new_tail, teacher_mass, mapped_mass, exact_mass)


def reference_targets(builder: Any, seq: CachedSequence) -> dict[str, Any]:
    """`CrossTokenizerTargets.__call__` as it was (no max_length cap, no validation), using `builder`'s tables."""
    text = seq.text
    text_bytes = text.encode("utf-8")
    c2b = char_to_byte_table(text)
    pieces = split_segments(seq.input_ids, seq.offsets, builder.specials, len(text))
    window = encode_student(builder._student_backend, text, pieces)
    s_cons = student_consumed(window, pieces, text, c2b, builder.student_bytes, builder._student_norm)
    t_cons = consumed_ends(seq.input_ids, seq.offsets, text, text_bytes, c2b, builder.teacher_bytes,
                           builder._teacher_norm)
    n = window.ids.shape[0]
    K = seq.topk_ids.shape[1]
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["student_tokens"] = n
    out = {
        "input_ids": window.ids[:n].astype(np.int64),
        "topk_ids": np.full((n, K), -1, dtype=np.int64),
        "topk_logprobs": np.zeros((n, K), dtype=np.float32),
        "tail_logprob": np.zeros(n, dtype=np.float32),
        "kd_mask": np.zeros(n, dtype=np.bool_),
        "pooled_hidden": seq.pooled_hidden.astype(np.float32),
        "stats": stats,
    }
    if not t_cons.matches_text:
        stats["skipped"] = 1
        return out
    teacher_pos = align(t_cons, s_cons)[:n]
    aligned = np.flatnonzero(teacher_pos >= 0)
    rows = teacher_pos[aligned]
    mapped = map_topk(seq.topk_ids[rows], seq.topk_logprobs[rows], seq.tail_logprob[rows], builder.vocab_map.ids,
                      builder.vocab_map.exact)
    out["topk_ids"][aligned] = mapped.ids
    out["topk_logprobs"][aligned] = mapped.logprobs
    out["tail_logprob"][aligned] = mapped.tail
    out["kd_mask"][aligned] = True
    stats.update(aligned=int(aligned.shape[0]), teacher_mass=mapped.teacher_mass,
                 mapped_mass=mapped.mapped_mass, exact_mass=mapped.exact_mass)
    return out
