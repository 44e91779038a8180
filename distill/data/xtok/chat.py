"""Cross-template windows: a student with another tokenizer re-renders the cached conversations with ITS OWN chat
template, and KD applies where both models have consumed the same message content.

Per cached piece (one conversation, or the part of one a window holds) the cache stores the messages and where each
message's content lies in the window text (`CachedSequence.conversation`: spans `[message, field, start, end,
offset]`). The student renders the same messages with its template (`cache_tools.format.conversations.render`, the
teacher's own span finder), keeps the part of its rendering that covers the same content as the teacher's piece, and
tokenises it. Every position on either side that has consumed text up to a point INSIDE a message's content gets a
content coordinate (piece, message, field, character offset); a student position and a teacher position with the
same coordinate predict the same next content character, and KD pairs them. A position whose consumed text ends in
template markup, or at the end of a content span (its next token is markup: an end-of-turn, a header, a think tag),
gets no coordinate and so no KD. The assistant mask of the student comes from its own rendering (`token_masks`, the
teacher's rule: assistant regions plus the end-of-turn token after each).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import conversations
from cache_tools.format.errors import TokenizerError


@dataclass
class ChatWindow:
    """The student's side of one cached conversational window. ids int64 [n], offsets int32 [n, 2] into `text`,
    assistant bool [n], segment_lengths int32 [d] (student tokens per piece), bases {(piece, message, field):
    coordinate base} shared with the teacher side, spans [(piece, message, field, start, end, offset)] in `text`."""

    ids: np.ndarray
    offsets: np.ndarray
    text: str
    assistant: np.ndarray
    segment_lengths: np.ndarray
    bases: dict[tuple[int, int, str], int]
    spans: list[tuple[int, int, str, int, int, int]]
    unrendered: int  # pieces the student template could not render (no student tokens for them)


def load_template(path: str | None, tokenizer: Any) -> str:
    """The student's chat template: the file `path` (--student_chat_template) or the tokenizer's own."""
    if path:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise TokenizerError(f"--student_chat_template {path}: cannot read ({err.strerror or err})") from err
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise TokenizerError(f"student tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, "
                             "and the cache holds conversations; pass --student_chat_template FILE")
    return template


def message_fields(msg: dict[str, Any]) -> dict[str, int]:
    """{field: length} of a message's text fields. Reasoning an assistant wrote inline (`<think>...</think>` at the
    start of its content, which templates split off) is addressed as "reasoning_content" with offsets into the
    content, as the span finder records it."""
    fields = {f: len(v) for f, v in msg.items() if f != "role" and isinstance(v, str)}
    fields.setdefault("reasoning_content", len(msg.get("content", "") or ""))
    return fields


def coordinate_bases(conversation: list[dict[str, Any]]) -> dict[tuple[int, int, str], int]:
    """One disjoint integer range per (piece, message, field) of the window: coordinate = base + character offset
    (each range one longer than its field, so a field's end never equals the next field's start)."""
    bases: dict[tuple[int, int, str], int] = {}
    next_base = 0
    for k, piece in enumerate(conversation):
        for m, msg in enumerate(piece["messages"]):
            for field, length in message_fields(msg).items():
                bases[(k, m, field)] = next_base
                next_base += length + 1
    return bases


def content_codes(char_ends: np.ndarray, spans: list[tuple[int, int, str, int, int, int]],
                  bases: dict[tuple[int, int, str], int]) -> np.ndarray:
    """int64 [n]: the content coordinate of each position whose consumed text ends inside a content span, its start
    included (the next character is content), its end excluded (the next character is markup, or lies past the
    window), else -1."""
    codes = np.full(char_ends.shape[0], -1, dtype=np.int64)
    for piece, msg, field, start, end, offset in spans:
        key = (piece, msg, field)
        if key not in bases:
            continue
        inside = (char_ends >= start) & (char_ends < end)
        codes[inside] = bases[key] + offset + (char_ends[inside] - start)
    return codes


def teacher_spans(conversation: list[dict[str, Any]]) -> list[tuple[int, int, str, int, int, int]]:
    return [(k, int(m), str(f), int(s), int(e), int(o)) for k, piece in enumerate(conversation)
            for m, f, s, e, o in piece["spans"]]


class StudentRenderer:
    """Renders cached conversation pieces with the student's template and tokenises them (fast tokenizer)."""

    def __init__(self, tokenizer: Any, template: str, kwargs: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.kwargs = kwargs or {}

    def piece(self, record: dict[str, Any]) -> tuple[str, list[tuple[int, str, int, int, int]], np.ndarray,
                                                     np.ndarray, np.ndarray] | None:
        """(text, spans, ids, offsets, assistant) of the student's tokens covering the same content as the cached
        piece `record`, coordinates relative to the returned text; None when the template cannot render it."""
        try:
            # prompt/completion strings were concatenated without a template: the student does the same
            plain = bool(record["messages"]) and bool(record["messages"][0].get("plain"))
            rendered = conversations.render(self.tokenizer, record["messages"], template=self.template,
                                            kwargs=self.kwargs, plain=plain, eos_text=self.tokenizer.eos_token or "",
                                            tools=record.get("tools"))
        except conversations.RenderError:
            return None
        begin, end = _student_range(rendered.spans, record["spans"], len(rendered.text))
        enc = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        assistant, _ = conversations.token_masks(offsets, rendered.regions)
        keep = (offsets[:, 0] >= begin) & (offsets[:, 0] < end)
        if not keep.any():
            return rendered.text[begin:begin], [], ids[:0], offsets[:0].astype(np.int32), assistant[:0]
        end = max(end, int(offsets[keep, 1].max()))
        spans = [(m, f, max(s, begin) - begin, min(e, end) - begin, o + max(0, begin - s))
                 for m, f, s, e, o in rendered.spans if s < end and e > begin]
        return (rendered.text[begin:end], spans, ids[keep], (offsets[keep] - begin).astype(np.int32),
                assistant[keep])

    def window(self, conversation: list[dict[str, Any]]) -> ChatWindow:
        """The student's window for a cached window's conversation records (pieces concatenated in order)."""
        texts, ids, offsets, assistant, lengths, spans = [], [], [], [], [], []
        cursor, unrendered = 0, 0
        for k, record in enumerate(conversation):
            part = self.piece(record)
            if part is None:
                unrendered += 1
                continue
            text, piece_spans, piece_ids, piece_offsets, piece_assistant = part
            texts.append(text)
            ids.append(piece_ids)
            offsets.append(piece_offsets + cursor)
            assistant.append(piece_assistant)
            if piece_ids.shape[0]:
                lengths.append(piece_ids.shape[0])
            spans.extend((k, m, f, s + cursor, e + cursor, o) for m, f, s, e, o in piece_spans)
            cursor += len(text)
        return ChatWindow(cat(ids, np.int64, (0,)), cat(offsets, np.int32, (0, 2)), "".join(texts),
                          cat(assistant, np.bool_, (0,)), np.asarray(lengths, dtype=np.int32),
                          coordinate_bases(conversation), spans, unrendered)


def cat(parts: list[np.ndarray], dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype=dtype)


def _locate(spans: list[tuple[int, str, int, int, int]], msg: int, field: str, offset: int, at_end: bool) -> int:
    """Index of the student span of (msg, field) holding character `offset` of that field (at_end: ending at or
    after it), or -1."""
    for i, (m, f, s, e, o) in enumerate(spans):
        if (m, f) == (msg, field) and ((o < offset <= o + e - s) if at_end else (o <= offset < o + e - s)):
            return i
    return -1


def _student_range(student_spans: list[tuple[int, str, int, int, int]], cached_spans: list[list[Any]],
                   text_len: int) -> tuple[int, int]:
    """[begin, end) of the student's rendering that covers the cached piece's content: from the start of the
    rendering (or, when the piece starts inside a field, that character; or after the content before its first
    field) to the end (or the matching character / the start of the next content after its last field)."""
    if not cached_spans:
        return 0, 0
    first_m, first_f, _, _, first_off = cached_spans[0]
    last_m, last_f, last_s, last_e, last_off = cached_spans[-1]
    begin, end = 0, text_len
    i = _locate(student_spans, int(first_m), str(first_f), int(first_off), at_end=False)
    if i >= 0:
        _, _, s, _, o = student_spans[i]
        if first_off > o:
            begin = s + first_off - o
        elif i > 0:
            begin = student_spans[i - 1][3]
    cut = int(last_off) + int(last_e) - int(last_s)
    j = _locate(student_spans, int(last_m), str(last_f), cut, at_end=True)
    if j >= 0:
        _, _, s, e, o = student_spans[j]
        if cut < o + e - s:
            end = s + cut - o
        elif j + 1 < len(student_spans):
            end = student_spans[j + 1][2]
    return begin, max(begin, end)
