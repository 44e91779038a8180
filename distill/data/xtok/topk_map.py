"""Vectorised remapping of teacher top-k rows onto student ids (no Python loop over rows or K).

Speed notes (a 512 x 256 window costs a few milliseconds, see docs): duplicate student ids within a row are found
with ONE flat sort of unique integer keys (row, student id, slot) instead of a stable per-row argsort, so numpy's
SIMD quicksort applies and the slot order falls out of the key without an argsort; the final re-sort by probability
touches only rows that are out of order after merging. The results are bit-identical to the plain per-row version
(tests/xtok_reference.py), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


class TopKMapper:
    """`map_topk` with the vocabulary map prepared once: `map_ids` [V_teacher] int64 student id or -1, `exact`
    [V_teacher] bool. Tables get one sentinel entry at index V_teacher (unmapped, not exact): a teacher id of -1
    (padding of sampled rows) indexes it from the end, an id of V_teacher (a padded head row) directly, and larger
    ids are clipped onto it."""

    def __init__(self, map_ids: np.ndarray, exact: np.ndarray) -> None:
        self.size = int(map_ids.shape[0])
        self.ids = np.append(map_ids.astype(np.int64), -1)
        self.exact = np.append(exact.astype(bool) & (map_ids >= 0), False)
        self.id_bound = int(max(self.ids.max(initial=-1), 0)) + 2  # student id + 1 lies in [0, id_bound)
        self._keys: dict[int, np.ndarray] = {}

    def _lookup(self, table: np.ndarray, teacher_ids: np.ndarray) -> np.ndarray:
        try:
            return table[teacher_ids]
        except IndexError:  # ids past the sentinel (a padded teacher head): clip them onto it
            return table[np.minimum(teacher_ids.view(np.uint64), np.uint64(self.size)).view(np.int64)]

    def _key_table(self, kbits: int) -> np.ndarray:
        """(student id + 1) << kbits per teacher id (0 = unmapped), int32 when it fits."""
        if kbits not in self._keys:
            dtype = np.int32 if (self.id_bound << kbits) < 2**31 else np.int64
            self._keys[kbits] = np.left_shift(self.ids + 1, kbits).astype(dtype)
        return self._keys[kbits]

    def __call__(self, teacher_ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> MappedTopK:
        """teacher_ids [m, K] int64 (>= -1), logprobs [m, K] (fp16/fp32), tail [m] -> MappedTopK (see `map_topk`)."""
        m, k = teacher_ids.shape
        lp = logprobs.astype(np.float32)
        p = np.exp(lp, dtype=np.float64)
        if m and teacher_ids.min() < 0:  # -1 slots of sampled rows hold no mass (their log-prob is a placeholder)
            p[teacher_ids < 0] = 0.0
        teacher_mass = float(p.sum())
        exact_mass = float(p[self._lookup(self.exact, teacher_ids)].sum())
        if m == 0:
            return MappedTopK(np.zeros((0, k), np.int64), lp, tail.astype(np.float32), teacher_mass, teacher_mass,
                              exact_mass)
        kbits = _bits(k)
        # Group equal student ids per row: sort the unique keys (id + 1, slot); slot order within a group is kept.
        key = self._lookup(self._key_table(kbits), teacher_ids)
        key |= np.arange(k, dtype=key.dtype)
        key.sort(axis=1)
        gid = key >> kbits  # student id + 1, 0 = unmapped (those sort first in their row)
        dup = np.zeros((m, k), dtype=bool)
        np.equal(gid[:, 1:], gid[:, :-1], out=dup[:, 1:])
        any_unmapped = bool((gid[:, 0] == 0).any())
        if any_unmapped:
            dup &= gid > 0  # unmapped entries are each their own (empty) group
        ids = self._lookup(self.ids, teacher_ids)
        if not any_unmapped and not dup.any():
            return MappedTopK(ids, lp, tail.astype(np.float32), teacher_mass, teacher_mass, exact_mass)

        # Sum each group over its members in slot order (the reference's reduceat over the id-sorted rows).
        where = (key & ((1 << kbits) - 1)).astype(np.int64)
        where += (np.arange(m, dtype=np.int64) * k)[:, None]
        where = where.ravel()  # id-sorted entry -> flat position in [m, K]
        p_sorted = p.ravel()[where]
        heads = np.flatnonzero(~dup.ravel())
        sums = np.add.reduceat(p_sorted, heads)
        if any_unmapped:
            live = gid.ravel()[heads] > 0  # mapped groups: each keeps its first slot
            heads, sums = heads[live], sums[live]
        grown = sums != p_sorted[heads]
        if grown.any():
            lp.ravel()[where[heads[grown]]] = np.log(np.maximum(sums[grown], 1e-300)).astype(np.float32)
        order, empty = _order(where[heads], sums, m, k, kbits)
        ids = ids.ravel()[order]
        ids[empty] = -1
        lp_out = lp.ravel()[order]
        lp_out[empty] = 0.0

        # Unmapped mass joins the tail; rows without any keep their stored tail exactly.
        new_tail = tail.astype(np.float32)
        lost_total = 0.0
        if any_unmapped:
            lost = np.where(self._lookup(self.ids, teacher_ids) < 0, p, 0.0).sum(axis=1)
            lost_total = float(lost.sum())
            rows = lost > 0
            if rows.any():
                new_tail[rows] = np.log(np.exp(tail[rows].astype(np.float64)) + lost[rows]).astype(np.float32)
        return MappedTopK(ids.reshape(m, k), lp_out.reshape(m, k), new_tail, teacher_mass,
                          teacher_mass - lost_total, exact_mass)


def _bits(k: int) -> int:
    return max(int(k - 1).bit_length(), 1)


def _order(positions: np.ndarray, sums: np.ndarray, m: int, k: int, kbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Output order of each row: the kept entries (flat `positions` [g] with probabilities `sums` [g]) by
    probability descending, ties by slot (a stable sort, as the reference's argsort(-p, kind="stable")), then the
    empty slots. Returns (flat source position [m*K], empty [m*K] bool).

    Probabilities are replaced by their rank among the window's distinct values, so (rank, slot) packs into one
    small integer and numpy's fast unstable row sort gives the stable order."""
    by_value = np.argsort(sums)
    ordered = sums[by_value]
    step = np.zeros(ordered.shape[0], dtype=np.int64)
    np.not_equal(ordered[1:], ordered[:-1], out=step[1:])
    rank = np.empty_like(step)
    rank[by_value] = np.cumsum(step)  # equal values share a rank
    top = int(rank.max(initial=0)) + 1  # ranks run 0..top-1, ascending in probability; `top` marks empty slots
    dtype = np.int32 if ((top + 1) << kbits) < 2**31 else np.int64
    key = np.full(m * k, top, dtype=dtype)
    key[positions] = (top - 1) - rank  # most probable first
    key <<= kbits
    key |= np.tile(np.arange(k, dtype=dtype), m)
    key = key.reshape(m, k)
    key.sort(axis=1)
    empty = key >= (top << kbits)
    key &= (1 << kbits) - 1
    slots = key.astype(np.int64)
    slots += (np.arange(m, dtype=np.int64) * k)[:, None]
    return slots.ravel(), empty.ravel()


def map_topk(teacher_ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, map_ids: np.ndarray,
             exact: np.ndarray) -> MappedTopK:
    """Map teacher rows [m, K] through `map_ids` [V_teacher] (ids past its end, e.g. padded head rows, and -1 slots
    of sampled rows are unmapped).

    Probabilities landing on the same student id are summed (log of the sum); unmapped mass joins the tail:
    tail' = log(exp(tail) + unmapped). A tail of -inf (sampled targets) stays -inf unless unmapped mass lands in it.
    Rows without merges or unmapped entries keep their values bit for bit, so the same tokenizer through this path
    gives exactly the direct path's targets. Build a `TopKMapper` once to map many windows.
    """
    return TopKMapper(map_ids, exact)(teacher_ids, logprobs, tail)
