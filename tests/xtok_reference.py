"""Reference copy of the cross-tokenizer top-k mapping as it was before the vectorised rewrite (commit f265a7a:
`map_topk` of topk_map.py), kept verbatim so a test can demand bit-identical outputs from the fast path. Not part of
the library; do not optimise."""

from __future__ import annotations

from typing import Any

import numpy as np

from cache_tools.format.reader import CachedSequence
from distill.data.xtok.topk_map import MappedTopK  # the result container (unchanged); the logic below is the copy


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
    """`builder(seq)` with its mapping replaced by the reference `map_topk` above. Only the mapping was rewritten
    since f265a7a (alignment and the example's assembly are unchanged), so this isolates what the test compares."""
    fast = builder._mapper
    builder._mapper = lambda ids, lp, tail: map_topk(ids, lp, tail, builder.vocab_map.ids, builder.vocab_map.exact)
    try:
        return builder(seq)
    finally:
        builder._mapper = fast
