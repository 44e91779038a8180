"""Per-window targets of a cross-template student (the conversational branch of `CrossTokenizerTargets`): the
student's own rendering of the cached conversations (`chat.StudentRenderer`), aligned with the teacher's window by
content coordinates (`chat.content_codes`), targets mapped through the vocabulary map like every cross-tokenizer
window. Output: the per-example dict of `CrossTokenizerTargets.__call__`."""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.data.xtok.align import char_to_byte_table, consumed_ends
from distill.data.xtok.chat import content_codes, teacher_spans
from distill.data.xtok.documents import blank_example


def match_codes(student_codes: np.ndarray, teacher_codes: np.ndarray) -> np.ndarray:
    """int64 [n_student]: the teacher position with the same content coordinate (the last one, when several
    positions share it), or -1."""
    out = np.full(student_codes.shape[0], -1, dtype=np.int64)
    valid = np.flatnonzero(teacher_codes >= 0)
    if valid.size == 0:
        return out
    order = np.argsort(teacher_codes[valid], kind="stable")
    codes, positions = teacher_codes[valid][order], valid[order]
    idx = np.searchsorted(codes, student_codes, side="right") - 1
    safe = np.clip(idx, 0, codes.shape[0] - 1)
    hit = (student_codes >= 0) & (idx >= 0) & (codes[safe] == student_codes)
    out[hit] = positions[safe[hit]]
    return out


def char_ends(ids: np.ndarray, offsets: np.ndarray, text: str, table: Any, normalize: Any) -> tuple[np.ndarray,
                                                                                                   np.ndarray, bool]:
    """(character end of each token's consumed text, complete bool [n], tokens reproduce the text)."""
    c2b = char_to_byte_table(text)
    consumed = consumed_ends(ids, offsets, text, text.encode("utf-8"), c2b, table, normalize)
    return np.searchsorted(c2b, consumed.ends), consumed.complete, consumed.matches_text


def chat_example(builder: Any, seq: Any) -> dict[str, Any]:
    """The student's example for a conversational window `seq` (`builder`: a CrossTokenizerTargets)."""
    conversation = seq.conversation
    window = builder.renderer.window(conversation)
    full = window.ids.shape[0]
    n = full if builder.max_length is None else min(full, builder.max_length)
    out = blank_example(window.ids[:n], seq.topk_ids.shape[1], seq.pooled_hidden)
    stats = out["stats"]
    stats["truncated"] = full - n
    if builder.isolated:
        lengths = np.minimum(window.segment_lengths, np.maximum(n - np.concatenate(
            [[0], np.cumsum(window.segment_lengths)[:-1]]), 0))
        out["segment_lengths"] = lengths[lengths > 0].astype(np.int32)
    label_mask = np.zeros(n, dtype=np.bool_)
    label_mask[:-1] = window.assistant[1:n]
    if builder.assistant_only:
        out["label_mask"] = label_mask
    stats["assistant_tokens"] = int(label_mask.sum())
    t_ends, t_complete, t_ok = char_ends(seq.input_ids, seq.offsets, seq.text, builder.teacher_bytes,
                                         builder._teacher_norm)
    if not t_ok:
        stats["skipped"] = 1
        return out
    s_ends, s_complete, _ = char_ends(window.ids[:n], window.offsets[:n], window.text, builder.student_bytes,
                                      builder._student_norm)
    t_codes = content_codes(t_ends, teacher_spans(conversation), window.bases)
    t_codes[~(t_complete & np.asarray(seq.target_mask, dtype=np.bool_))] = -1
    s_codes = content_codes(s_ends, window.spans, window.bases)
    s_codes[~s_complete] = -1
    teacher_pos = match_codes(s_codes, t_codes)
    if builder.assistant_only:
        teacher_pos[~label_mask] = -1
    aligned = np.flatnonzero(teacher_pos >= 0)
    rows = teacher_pos[aligned]
    mapped = builder._mapper(seq.topk_ids[rows], seq.topk_logprobs[rows], seq.tail_logprob[rows])
    out["topk_ids"][aligned] = mapped.ids
    out["topk_logprobs"][aligned] = mapped.logprobs
    out["tail_logprob"][aligned] = mapped.tail
    out["kd_mask"][aligned] = True
    stats.update(aligned=int(aligned.shape[0]), teacher_mass=mapped.teacher_mass, mapped_mass=mapped.mapped_mass,
                 exact_mass=mapped.exact_mass, assistant_aligned=int(label_mask[aligned].sum()))
    return out
