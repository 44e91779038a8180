"""Reference copy of the cross-tokenizer targets as they were before the vectorised rewrite (commit f265a7a:
distill/data/xtok/align.py, topk_map.py and `CrossTokenizerTargets.__call__`), kept verbatim so a test can demand
bit-identical outputs from the fast path. Not part of the library; do not optimise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_tools.reader import CachedSequence
from distill.data.xtok.token_bytes import TokenBytes, utf8_tail_complete

STAT_KEYS = ("student_tokens", "aligned", "teacher_mass", "mapped_mass", "exact_mass", "skipped", "truncated")

@dataclass
class Consumed:
    """ends: int64 [n] byte end of each token in the window text; complete: bool [n]; byte_mode: how ends were
    found; matches_text: the tokens' bytes (or the normalised text) reproduce the window text."""

    ends: np.ndarray
    complete: np.ndarray
    byte_mode: bool
    matches_text: bool


def char_to_byte_table(text: str) -> np.ndarray:
    """int64 [len(text) + 1]: byte offset of each character offset."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    widths = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    return np.concatenate([[0], np.cumsum(widths)])


def _is_continuation(text_bytes: np.ndarray, at: np.ndarray) -> np.ndarray:
    inside = at < text_bytes.shape[0]
    nxt = text_bytes[np.minimum(at, max(text_bytes.shape[0] - 1, 0))] if text_bytes.shape[0] else np.zeros_like(at)
    return inside & ((nxt & 0xC0) == 0x80)


def consumed_ends(ids: np.ndarray, offsets: np.ndarray, text: str, text_bytes: bytes, c2b: np.ndarray,
                  table: TokenBytes, normalize: Any = None) -> Consumed:
    """Byte ends + completeness for tokens `ids` [n] with char `offsets` [n, 2] into `text` (whose UTF-8 is
    `text_bytes`, `c2b` its char->byte table). `normalize` is the tokenizer's normaliser (str -> str) or None."""
    n = ids.shape[0]
    buf = np.frombuffer(text_bytes, dtype=np.uint8).astype(np.int64)
    if n == 0:
        return Consumed(np.zeros(0, np.int64), np.zeros(0, bool), True, True)
    stream = table.join(ids)
    # A window may open on the tail of a character (its first token continues an emoji cut by the previous window)
    # or close on the head of one: the text holds the whole character, the tokens part of it.
    lead = text_bytes.find(stream) if len(stream) <= len(text_bytes) else -1
    if lead >= 0 and lead < 4 and len(text_bytes) - lead - len(stream) < 4:
        ends = lead + np.cumsum(table.lengths[ids])
        complete = ~_is_continuation(buf, ends)
        return Consumed(ends, complete, True, True)
    reference = (normalize(text) if normalize is not None else text).encode("utf-8")
    # Normalisers and dummy prefixes move whitespace around; anything else differing means the cached text is not
    # what these tokens encode.
    squashed, ref = _squash(stream), _squash(reference)
    at = ref.find(squashed)
    matches = 0 <= at < 4 and len(ref) - at - len(squashed) < 4
    ends = c2b[np.clip(offsets[:, 1].astype(np.int64), 0, len(text))]
    complete = np.ones(n, dtype=bool)
    complete[:-1] = ends[:-1] != ends[1:]
    complete[-1] = utf8_tail_complete(table.join(ids[-4:]))
    return Consumed(ends, complete, False, matches)


_WHITESPACE = bytes(range(0x21))


def _squash(data: bytes) -> bytes:
    return data.translate(None, _WHITESPACE)


@dataclass
class StudentWindow:
    """The window re-tokenised by the student: ids int64 [n], char offsets int32 [n, 2], special bool [n];
    run_counts: tokens per piece (1 for a special)."""

    ids: np.ndarray
    offsets: np.ndarray
    special: np.ndarray
    run_counts: list[int]


def split_segments(teacher_ids: np.ndarray, teacher_offsets: np.ndarray, special_to_student: dict[int, int],
                   text_len: int) -> list[tuple[int, int, int]]:
    """The window as pieces (start, end, student_special_id): text runs (id -1) between the teacher's special tokens
    that the student can represent; those become the student's own special id over the same characters."""
    pieces: list[tuple[int, int, int]] = []
    cursor = 0
    is_special = np.isin(teacher_ids, np.fromiter(special_to_student, dtype=np.int64, count=len(special_to_student)))
    for t in np.flatnonzero(is_special).tolist():
        s_id = special_to_student[int(teacher_ids[t])]
        if s_id < 0:
            continue  # no student counterpart: its literal text stays ordinary text for the student
        start, end = int(teacher_offsets[t, 0]), int(teacher_offsets[t, 1])
        if start < cursor:
            continue
        if start > cursor:
            pieces.append((cursor, start, -1))
        pieces.append((start, end, s_id))
        cursor = end
    if cursor < text_len:
        pieces.append((cursor, text_len, -1))
    return pieces


def encode_student(student_backend: Any, text: str, pieces: list[tuple[int, int, int]]) -> StudentWindow:
    """Encode each text run separately (documents were tokenised separately by the teacher too) and insert the
    student's special ids between them."""
    runs = [text[a:b] for a, b, s in pieces if s < 0]
    encodings = student_backend.encode_batch(runs, add_special_tokens=False) if runs else []
    ids: list[np.ndarray] = []
    offs: list[np.ndarray] = []
    special: list[np.ndarray] = []
    counts: list[int] = []
    run = 0
    for start, end, s_id in pieces:
        if s_id >= 0:
            ids.append(np.array([s_id], np.int64))
            offs.append(np.array([[start, end]], np.int32))
            special.append(np.ones(1, bool))
            counts.append(1)
            continue
        enc = encodings[run]
        run += 1
        counts.append(len(enc.ids))
        if not enc.ids:
            continue
        ids.append(np.asarray(enc.ids, np.int64))
        offs.append(np.asarray(enc.offsets, np.int32).reshape(-1, 2) + start)
        special.append(np.zeros(len(enc.ids), bool))
    if not ids:
        return StudentWindow(np.zeros(0, np.int64), np.zeros((0, 2), np.int32), np.zeros(0, bool), counts)
    return StudentWindow(np.concatenate(ids), np.concatenate(offs), np.concatenate(special), counts)


def student_consumed(window: StudentWindow, pieces: list[tuple[int, int, int]], text: str, c2b: np.ndarray,
                     table: TokenBytes, normalize: Any = None) -> Consumed:
    """Consumed ends of the student tokens, run by run (each run is its own little text); special tokens consumed
    exactly their span."""
    ends = np.zeros(window.ids.shape[0], np.int64)
    complete = np.ones(window.ids.shape[0], bool)
    byte_mode = True
    pos = 0
    for (start, end, s_id), count in zip(pieces, window.run_counts, strict=True):
        if s_id >= 0:
            ends[pos] = c2b[end]
            pos += 1
            continue
        if count == 0:
            continue
        segment = text[start:end]
        seg_bytes = segment.encode("utf-8")
        seg_c2b = c2b[start : end + 1] - c2b[start]
        sub = consumed_ends(window.ids[pos : pos + count], window.offsets[pos : pos + count] - start, segment,
                            seg_bytes, seg_c2b, table, normalize)
        ends[pos : pos + count] = sub.ends + c2b[start]
        complete[pos : pos + count] = sub.complete
        byte_mode &= sub.byte_mode
        pos += count
    return Consumed(ends, complete, byte_mode, True)


def align(teacher: Consumed, student: Consumed) -> np.ndarray:
    """int64 [n_student]: the aligned teacher position of each student position, or -1.

    Among complete positions sharing one end (zero-length tokens), only the last is kept on each side: it is the one
    whose next token actually starts the continuation."""
    out = np.full(student.ends.shape[0], -1, dtype=np.int64)
    t_pos = np.flatnonzero(teacher.complete)
    s_pos = np.flatnonzero(student.complete)
    if t_pos.size == 0 or s_pos.size == 0:
        return out
    t_pos = _last_of_equal_runs(t_pos, teacher.ends)
    s_pos = _last_of_equal_runs(s_pos, student.ends)
    t_ends = teacher.ends[t_pos]
    idx = np.searchsorted(t_ends, student.ends[s_pos])
    idx_c = np.minimum(idx, t_ends.shape[0] - 1)
    hit = (idx < t_ends.shape[0]) & (t_ends[idx_c] == student.ends[s_pos])
    out[s_pos[hit]] = t_pos[idx_c[hit]]
    return out


def _last_of_equal_runs(positions: np.ndarray, ends: np.ndarray) -> np.ndarray:
    values = ends[positions]
    keep = np.ones(positions.shape[0], dtype=bool)
    keep[:-1] = values[:-1] != values[1:]
    return positions[keep]


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
