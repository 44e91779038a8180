"""Per-document and per-role facts of a cached window carried over to the student's re-tokenisation of the same text.

Teacher facts are per teacher token; the student sees the window's text through its own tokens, so they travel as
character positions: where each packed document starts (isolated packing: the student tokenises each document
alone and attends within it), and which characters are assistant content (assistant-only loss).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.data.packing import segment_lengths_of
from distill.data.xtok.store import STAT_KEYS


def document_starts(seq: Any, text_len: int) -> np.ndarray | None:
    """int64 [d]: the character where each packed document piece starts in the window text (the first at 0), or
    None when the window holds one piece."""
    lengths = segment_lengths_of(seq)
    if lengths.shape[0] <= 1:
        return None
    first_tokens = np.cumsum(lengths)[:-1]
    starts = np.concatenate([[0], seq.offsets[first_tokens, 0].astype(np.int64)])
    return np.minimum(starts, text_len)


def cut_pieces(pieces: list[tuple[int, int, int]], starts: np.ndarray) -> list[tuple[int, int, int]]:
    """Split the text runs of `pieces` (start, end, special id; -1 = text) at every document start inside them."""
    out: list[tuple[int, int, int]] = []
    cuts = starts.tolist()
    for start, end, special in pieces:
        if special >= 0:
            out.append((start, end, special))
            continue
        inner = [c for c in cuts if start < c < end]
        for a, b in zip([start, *inner], [*inner, end], strict=True):
            out.append((a, b, -1))
    return out


def student_segments(student_starts: np.ndarray, doc_starts: np.ndarray) -> np.ndarray:
    """int32 [d'] student tokens per document (documents the student kept no token of are dropped), given each
    student token's first character."""
    if student_starts.shape[0] == 0:
        return np.zeros(0, dtype=np.int32)
    owner = np.searchsorted(doc_starts, student_starts.astype(np.int64), side="right") - 1
    counts = np.bincount(np.maximum(owner, 0), minlength=doc_starts.shape[0])
    return counts[counts > 0].astype(np.int32)


def assistant_chars(seq: Any, text_len: int) -> np.ndarray:
    """bool [text_len]: characters covered by a teacher token marked assistant content."""
    chars = np.zeros(text_len + 1, dtype=np.int64)
    marked = np.flatnonzero(np.asarray(seq.assistant_mask, dtype=np.bool_))
    spans = seq.offsets[marked].astype(np.int64)
    np.add.at(chars, np.clip(spans[:, 0], 0, text_len), 1)
    np.add.at(chars, np.clip(spans[:, 1], 0, text_len), -1)
    return np.cumsum(chars)[:text_len] > 0


def next_is_assistant(seq: Any, student_offsets: np.ndarray) -> np.ndarray:
    """bool [n]: the student token after position s starts in assistant content (position s's label counts)."""
    text_len = len(seq.text)
    chars = assistant_chars(seq, text_len)
    starts = student_offsets[:, 0].astype(np.int64)
    is_assistant = np.zeros(starts.shape[0], dtype=np.bool_)
    inside = starts < text_len
    is_assistant[inside] = chars[starts[inside]]
    out = np.zeros_like(is_assistant)
    out[:-1] = is_assistant[1:]
    return out


def blank_example(input_ids: np.ndarray, K: int, pooled_hidden: np.ndarray) -> dict[str, Any]:
    """A student example of n = len(input_ids) tokens with no KD target yet (empty top-k rows, kd_mask False) and
    zeroed alignment stats; the cross-tokenizer builders fill in the positions they align."""
    n = int(input_ids.shape[0])
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["student_tokens"] = n
    return {
        "input_ids": input_ids.astype(np.int64),
        "topk_ids": np.full((n, K), -1, dtype=np.int64),
        "topk_logprobs": np.zeros((n, K), dtype=np.float32),
        "tail_logprob": np.zeros(n, dtype=np.float32),
        "kd_mask": np.zeros(n, dtype=np.bool_),
        "pooled_hidden": pooled_hidden.astype(np.float32),
        "stats": stats,
    }
