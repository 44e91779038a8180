"""Packing tokenised documents into windows of at most max_length tokens, for plain text (`pack_windows`: EOS between
documents, cut anywhere) and rendered conversations (`pack_conversations`: no separator, a conversation that fits a
window is never cut). Every window records the pieces it holds (`segment_lengths`), so the teacher and the student can
keep them from attending to each other (format 3, see `schema`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache_tools.format.errors import DatasetInputError, TokenizerError

_TOKENIZE_GROUP = 64  # documents per batched tokenizer call (fast tokenizers parallelise inside a batch)


@dataclass
class Window:
    """One packed window of n <= max_length tokens; `offsets[i]` = (start, end) of token i in `text`.
    `segment_lengths` = tokens of each document piece in order (sum n); conversational windows also carry
    `assistant_mask` [n], `target_mask` [n] (position t predicts an assistant token) and `conversation` (one record
    per piece: row, messages, content spans in window text, see `schema`)."""

    input_ids: np.ndarray  # [n] int64
    offsets: np.ndarray  # [n, 2] int32
    text: str
    doc_index: int
    segment_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    assistant_mask: np.ndarray | None = None
    target_mask: np.ndarray | None = None
    conversation: list[dict[str, Any]] | None = None


@dataclass
class Piece:
    """A tokenised document (plain text or one rendered conversation) before packing. For a conversation:
    `assistant` / `targets` per token and `spans` (message, field, start, end, offset) in `text` coordinates."""

    doc_index: int
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    assistant: np.ndarray | None = None
    targets: np.ndarray | None = None
    messages: list[dict[str, Any]] | None = None
    spans: list[tuple[int, str, int, int, int]] | None = None
    tools: list[Any] | None = None  # the row's tool schemas (a student's template renders them too)


def eos_of(tokenizer: Any) -> tuple[int, str]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; pass a tokenizer "
                             "with eos_token set (--tokenizer)")
    return int(eos_id), str(tokenizer.eos_token)


def require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError("tokenizer is not a fast (Rust) tokenizer; character offsets need one (save it with "
                             "`tokenizers` or pass a fast --tokenizer)")


def tokenized(tokenizer: Any, documents: Iterable[tuple[int, str]]) -> Iterator[Piece]:
    """One `Piece` per non-empty document, tokenising groups of documents per call."""
    require_fast(tokenizer)
    group: list[tuple[int, str]] = []

    def flush() -> Iterator[Piece]:
        enc = tokenizer([t for _, t in group], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for (doc_index, text), ids, offs in zip(group, enc["input_ids"], enc["offset_mapping"], strict=True):
            if ids:
                yield Piece(doc_index, text, ids, offs)
        group.clear()

    for doc_index, text in documents:
        if text:
            group.append((doc_index, text))
        if len(group) >= _TOKENIZE_GROUP:
            yield from flush()
    if group:
        yield from flush()


class _WindowBuilder:
    """Accumulates one window: token ids plus the pieces of text they cover, each piece one run of tokens of one
    document (or one EOS), so offsets are re-based onto the window's own text."""

    def __init__(self, conversational: bool = False) -> None:
        self.ids: list[int] = []
        self.offsets: list[tuple[int, int]] = []
        self.pieces: list[str] = []
        self.length_chars = 0
        self.doc_index = -1
        self.segments: list[int] = []
        self.segment_doc = -1
        self.conversational = conversational
        self.assistant: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.records: list[dict[str, Any]] = []

    def _extend_segment(self, doc_index: int, count: int) -> None:
        if self.segments and self.segment_doc == doc_index:
            self.segments[-1] += count
        else:
            self.segments.append(count)
            self.segment_doc = doc_index

    def add_run(self, piece: Piece, lo_token: int, hi_token: int) -> None:
        """Tokens [lo_token, hi_token) of `piece`."""
        if self.doc_index < 0:
            self.doc_index = piece.doc_index
        offsets = piece.offsets[lo_token:hi_token]
        lo = min(start for start, _ in offsets)
        hi = max(end for _, end in offsets)
        base = self.length_chars - lo
        self.ids.extend(piece.ids[lo_token:hi_token])
        self.offsets.extend((s + base, e + base) for s, e in offsets)
        self.pieces.append(piece.text[lo:hi])
        self.length_chars += hi - lo
        self._extend_segment(piece.doc_index, hi_token - lo_token)
        if self.conversational:
            self.assistant.append(piece.assistant[lo_token:hi_token])
            self.targets.append(piece.targets[lo_token:hi_token])
            spans = []
            for msg, name, start, end, offset in piece.spans or ():
                s, e = max(start, lo), min(end, hi)
                if s < e:  # clipped to the part of the conversation this window holds
                    spans.append([msg, name, s + base, e + base, offset + s - start])
            record = {"row": piece.doc_index, "messages": piece.messages, "spans": spans}
            self.records.append({**record, "tools": piece.tools} if piece.tools else record)

    def add_eos(self, doc_index: int, eos_id: int, eos_text: str) -> None:
        if self.doc_index < 0:
            self.doc_index = doc_index  # a window opening on a separator belongs to the document it closes
        self.ids.append(eos_id)
        self.offsets.append((self.length_chars, self.length_chars + len(eos_text)))
        self.pieces.append(eos_text)
        self.length_chars += len(eos_text)
        self._extend_segment(doc_index, 1)

    def window(self) -> Window:
        return Window(
            input_ids=np.asarray(self.ids, dtype=np.int64),
            offsets=np.asarray(self.offsets, dtype=np.int32).reshape(-1, 2),
            text="".join(self.pieces),
            doc_index=self.doc_index,
            segment_lengths=np.asarray(self.segments, dtype=np.int32),
            assistant_mask=np.concatenate(self.assistant).astype(bool) if self.conversational else None,
            target_mask=np.concatenate(self.targets).astype(bool) if self.conversational else None,
            conversation=self.records if self.conversational else None,
        )


def _check_length(max_length: int) -> None:
    if max_length < 1:
        raise DatasetInputError(f"--max-length must be >= 1, got {max_length}")


def pack_windows(tokenizer: Any, documents: Iterable[tuple[int, str]], max_length: int) -> Iterator[Window]:
    """Concatenate the documents' tokens with EOS between documents and cut the stream into windows of exactly
    `max_length` tokens (the last may be shorter). A long document spans several windows; nothing is truncated.
    A piece (segment) is one document's tokens plus the EOS that closes it."""
    _check_length(max_length)
    eos_id, eos_text = eos_of(tokenizer)
    current = _WindowBuilder()
    previous_doc = -1
    for piece in tokenized(tokenizer, documents):
        if previous_doc >= 0:
            current.add_eos(previous_doc, eos_id, eos_text)
            if len(current.ids) == max_length:
                yield current.window()
                current = _WindowBuilder()
        previous_doc = piece.doc_index
        pos = 0
        while pos < len(piece.ids):
            take = min(max_length - len(current.ids), len(piece.ids) - pos)
            current.add_run(piece, pos, pos + take)
            pos += take
            if len(current.ids) == max_length:
                yield current.window()
                current = _WindowBuilder()
    if current.ids:
        yield current.window()


def pack_conversations(pieces: Iterable[Piece], max_length: int, *, long: str = "split",
                       counts: dict[str, int] | None = None) -> Iterator[Window]:
    """Pack rendered conversations into windows with no separator (each piece is isolated by its segment). A
    conversation that fits in a window is never cut: it starts a new window when the current one cannot hold it.
    A longer one is split across fresh windows, its masks carried (`long="split"`), or skipped (`"skip"`); either
    way `counts["split"]` / `counts["skipped"]` say how many."""
    _check_length(max_length)
    counts = {} if counts is None else counts
    current = _WindowBuilder(conversational=True)
    for piece in pieces:
        n = len(piece.ids)
        if n > max_length and long == "skip":
            counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        if current.ids and len(current.ids) + n > max_length:
            yield current.window()
            current = _WindowBuilder(conversational=True)
        if n > max_length:
            counts["split"] = counts.get("split", 0) + 1
        pos = 0
        while pos < n:
            take = min(max_length - len(current.ids), n - pos)
            current.add_run(piece, pos, pos + take)
            pos += take
            if len(current.ids) == max_length:
                yield current.window()
                current = _WindowBuilder(conversational=True)
    if current.ids:
        yield current.window()


def isolated_attention(segments: list[np.ndarray], length: int, dtype: Any, device: Any = None) -> tuple[Any, Any]:
    """(mask [B, 1, T, T] additive float of `dtype`, position_ids [B, T] int64) that keep each piece of a packed
    window to itself: positions restart at 0 in every piece and a token attends only to earlier tokens of its own
    piece. Built here because transformers derives a packed mask from position_ids only when no 2-D attention mask is
    passed (our batches are padded), and eager attention adds a 4-D mask, so it must be additive (0 / dtype min),
    which SDPA takes as well. Padding positions attend to themselves only (finite softmax, never read)."""
    import torch

    B = len(segments)
    piece = torch.full((B, length), -1, dtype=torch.int64)
    position = torch.zeros((B, length), dtype=torch.int64)
    for row, lengths in enumerate(segments):
        start = 0
        for index, count in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
            piece[row, start : start + count] = index
            position[row, start : start + count] = torch.arange(count)
            start += count
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    allowed = (piece[:, :, None] == piece[:, None, :]) & (piece[:, :, None] >= 0) & causal
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    mask = torch.zeros((B, 1, length, length), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask.to(device), position.to(device)
