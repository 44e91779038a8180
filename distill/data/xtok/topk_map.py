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
    [V_teacher] bool. One sentinel entry (-1, not exact) is appended, so any teacher id outside [0, V_teacher)
    (padded head rows, -1 padding of sampled rows) is looked up without a mask."""

    def __init__(self, map_ids: np.ndarray, exact: np.ndarray) -> None:
        self.size = int(map_ids.shape[0])
        self.ids = np.append(map_ids.astype(np.int64), -1)
        self.exact = np.append(exact.astype(bool) & (map_ids >= 0), False)
        self.id_bound = int(max(self.ids.max(initial=-1), 0)) + 2  # student id + 1 lies in [0, id_bound)

    def __call__(self, teacher_ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray) -> MappedTopK:
        """teacher_ids [m, K] int64, logprobs [m, K] (fp16/fp32), tail [m] -> MappedTopK (see `map_topk`)."""
        m, k = teacher_ids.shape
        lp = logprobs.astype(np.float32)
        # Viewed as unsigned, -1 and every id past the table become >= size: one minimum sends them to the sentinel.
        lookup = np.minimum(teacher_ids.view(np.uint64), np.uint64(self.size)).view(np.int64)
        ids = self.ids[lookup]  # a fresh array: edited in place below
        p = np.exp(lp, dtype=np.float64)
        padding = teacher_ids < 0
        if padding.any():  # -1 slots of sampled rows hold no mass (their stored log-prob is a placeholder)
            p[padding] = 0.0
        teacher_mass = float(p.sum())
        exact_mass = float(p[self.exact[lookup]].sum())
        unmapped = ids < 0
        any_unmapped = bool(unmapped.any())

        cols, dup_sorted = self._group(ids, k)
        dup_rows = np.flatnonzero(dup_sorted.any(axis=1))
        merged = p
        empty = unmapped
        if dup_rows.size:
            merged, empty = _merge(dup_rows, cols, dup_sorted, p, lp, unmapped)
        any_empty = any_unmapped or dup_rows.size > 0
        if any_empty:
            ids[empty] = -1
            lp[empty] = 0.0

        # Unmapped mass joins the tail; rows without any keep their stored tail exactly.
        new_tail = tail.astype(np.float32)
        lost_total = 0.0
        if any_unmapped:
            lost = np.where(unmapped, p, 0.0).sum(axis=1)
            lost_total = float(lost.sum())
            rows = lost > 0
            if rows.any():
                new_tail = new_tail.copy()
                new_tail[rows] = np.log(np.exp(tail[rows].astype(np.float64)) + lost[rows]).astype(np.float32)
        if any_empty:
            _sort_rows(ids, lp, merged, empty)
        return MappedTopK(ids, lp, new_tail, teacher_mass, teacher_mass - lost_total, exact_mass)

    def _group(self, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The stable per-row sort of `ids` [m, K] by student id: `cols` [m, K] (the slot of each sorted entry) and
        `dup_sorted` [m, K] (in that order: the entry repeats the previous one's student id >= 0). The key
        (id + 1, slot) is unique within a row, so numpy's fast unstable sort gives the stable order, and the slot
        is read back from the key without an argsort."""
        kbits = _bits(k)
        dtype = np.int32 if (self.id_bound << kbits) < 2**31 else np.int64
        key = np.left_shift((ids + 1).astype(dtype), kbits)
        key |= np.arange(k, dtype=dtype)
        key.sort(axis=1)
        cols = key & dtype((1 << kbits) - 1)
        key >>= kbits  # student id + 1
        dup_sorted = np.zeros(key.shape, dtype=bool)
        np.equal(key[:, 1:], key[:, :-1], out=dup_sorted[:, 1:])
        dup_sorted[:, 1:] &= key[:, 1:] > 0
        return cols, dup_sorted


def _bits(k: int) -> int:
    return max(int(k - 1).bit_length(), 1)


def _flat(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """Flat positions [len(rows) * K] of `cols` [len(rows), K] (slots of those rows) in a C-ordered [m, K] array."""
    return (cols.astype(np.int64) + (rows * k)[:, None]).ravel()


def _merge(rows: np.ndarray, cols: np.ndarray, dup_sorted: np.ndarray, p: np.ndarray, lp: np.ndarray,
           unmapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the probabilities of each group of equal student ids in `rows`: the group's first slot (its most probable
    member) takes the sum and, where it grew, log(sum) in `lp` (in place); the others become empty. Sums run over
    the members in slot order (np.add.reduceat over the id-sorted rows), exactly as the reference does. Returns
    merged p [m, K] and empty [m, K]."""
    k = p.shape[1]
    where = _flat(rows, cols[rows], k)  # sorted entry -> flat position
    flat_dup = dup_sorted[rows].ravel()
    starts = np.flatnonzero(~flat_dup)
    sums = np.add.reduceat(p.ravel()[where], starts)
    heads = where[starts]
    merged = p.copy()
    merged.ravel()[heads] = sums
    empty = unmapped.copy()
    empty.ravel()[where[flat_dup]] = True
    grown = (sums != p.ravel()[heads]) & ~unmapped.ravel()[heads]
    if grown.any():
        lp.ravel()[heads[grown]] = np.log(np.maximum(sums[grown], 1e-300)).astype(np.float32)
    return merged, empty


def _sort_rows(ids: np.ndarray, lp: np.ndarray, merged: np.ndarray, empty: np.ndarray) -> None:
    """In place: stable sort of each row by probability descending, empty slots last (the reference's
    argsort(-where(empty, -1, merged), kind="stable")). Rows already in order are left alone (their stable argsort
    is the identity). The others are sorted by an integer key (probability bits, slot): the probability's low
    `kbits` bits are dropped to make room for the slot, so rows where that made two different probabilities tie
    fall back to the float argsort."""
    neg = np.where(empty, 1.0, -merged)
    bad = np.flatnonzero(~(neg[:, 1:] >= neg[:, :-1]).all(axis=1))
    if not bad.size:
        return
    m, k = ids.shape
    kbits = _bits(k)
    top = np.uint64(1 << (63 - kbits))
    # Non-negative doubles order like their bit patterns; invert so that larger probabilities come first.
    value = (top - np.uint64(1)) - (merged[bad].view(np.uint64) >> np.uint64(kbits))
    value[empty[bad]] = top
    key = (value << np.uint64(kbits)) | np.arange(k, dtype=np.uint64)
    key.sort(axis=1)
    cols = (key & np.uint64((1 << kbits) - 1)).astype(np.int64)
    key >>= np.uint64(kbits)
    ties = (key[:, 1:] == key[:, :-1]) & (key[:, 1:] < top)
    if ties.any():  # truncated probabilities tie: compare the full values
        r, c = np.nonzero(ties)
        full = merged[bad].ravel()
        differ = full[r * k + cols[r, c]] != full[r * k + cols[r, c + 1]]
        slow = np.unique(r[differ])
        if slow.size:
            cols[slow] = np.argsort(neg[bad[slow]], axis=1, kind="stable")
    where = _flat(bad, cols, k)
    ids[bad] = ids.ravel()[where].reshape(-1, k)
    lp[bad] = lp.ravel()[where].reshape(-1, k)


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
