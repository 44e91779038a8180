"""Conversations (TRL's dataset formats) rendered with a chat template, with exact character spans of every message's
content and the assistant regions, found WITHOUT `{% generation %}` markers: the teacher side builds its cache with
this module and a student with another template re-renders the same messages with it.

Row formats: ``messages`` (a list of {role, content[, reasoning_content]}), ``prompt_completion`` (``prompt`` +
``completion``, each a string or a list of messages: plain strings are concatenated without a template, as TRL's
standard format; lists are rendered as one conversation) and ``text`` (plain documents, not handled here).

How spans are found: render the whole conversation once; then, message by message in order, search the rendered text
(from where the previous message's content ended) for each piece of the message's content, verbatim, or, failing
that, with the newlines (then whitespace) at its ends stripped, as templates do; the span records its offset into the
content so it is exact either way. Reasoning (``reasoning_content``, or ``<think>...</think>`` at the start of an
assistant content, which templates such as Qwen3's split off) is its own piece: a template may drop it from earlier
turns (then it has no span). An assistant message whose answer cannot be found is refused (`RenderError`) rather than
given a mask that might be shifted. An assistant region starts where the template's generation prompt for that turn
ends (when rendering the preceding messages with ``add_generation_prompt=True`` gives a prefix of the full text: it
then includes template text the model generates, such as Qwen3's think block) or else at its first content span, and
ends at its last content span; the token after a region (the end-of-turn token) is assistant content too."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
CONTENT, REASONING = "content", "reasoning_content"
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class BadRow(ValueError):
    """A dataset row that cannot be a conversation (the message names what is wrong; the caller adds file/row)."""


class RenderError(ValueError):
    """The chat template raised, or rewrote a message's content so that it cannot be located exactly."""


@dataclass
class Rendered:
    """A conversation rendered with a template. spans: (message, field, start, end, offset) with
    text[start:end] == messages[message][field][offset:offset + end - start]; regions: assistant (start, end)."""

    text: str
    messages: list[dict[str, Any]]
    spans: list[tuple[int, str, int, int, int]]
    regions: list[tuple[int, int]]
    plain: bool = False  # prompt/completion strings concatenated without a template


def detect_row_format(columns: list[str]) -> str:
    """TRL's naming: the first of `ROW_FORMATS` whose columns are all there (`messages`, or `prompt` + `completion`),
    else plain text."""
    return next((name for name, fmt in ROW_FORMATS.items() if all(c in columns for c in fmt.columns)), "text")


def check_messages(value: Any, what: str = "messages") -> list[dict[str, Any]]:
    """The messages of a row, each {role, content[, reasoning_content]} with string values; raises BadRow."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"{what} is {type(value).__name__ if value is not None else 'missing'}, not a non-empty list of "
                     "{role, content} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow(f"{what}[{i}] is {type(msg).__name__}, not a {{role, content}} object")
        role, content = msg.get("role"), msg.get(CONTENT)
        if role is None:
            raise BadRow(f"{what}[{i}] has no role")
        if role not in ROLES:
            raise BadRow(f"{what}[{i}] has unknown role {role!r} (known: {', '.join(ROLES)})")
        if content is None:
            raise BadRow(f"{what}[{i}] ({role}) has no content")
        if not isinstance(content, str):
            raise BadRow(f"{what}[{i}] ({role}) content is {type(content).__name__}, not a string")
        clean = {"role": role, CONTENT: content}
        reasoning = msg.get(REASONING)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise BadRow(f"{what}[{i}] ({role}) reasoning_content is {type(reasoning).__name__}, not a string")
            clean[REASONING] = reasoning
        out.append(clean)
    return out


def _messages_row(row: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    return check_messages(row.get("messages")), False


def _prompt_completion_row(row: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", CONTENT: prompt}, {"role": "assistant", CONTENT: completion}], True
    if isinstance(prompt, list) and isinstance(completion, list):
        if not any(m["role"] == "assistant" for m in check_messages(completion, "completion")):
            raise BadRow("completion holds no assistant message")
        return check_messages(prompt, "prompt") + check_messages(completion, "completion"), False
    raise BadRow(f"prompt/completion are {type(prompt).__name__}/{type(completion).__name__}; both must be strings "
                 "or both lists of messages")


@dataclass(frozen=True)
class RowFormat:
    """A conversational row format: the columns that identify it (all present) and how one row becomes
    (messages, plain), plain = strings concatenated without a template. Raises BadRow."""

    columns: tuple[str, ...]
    messages: Callable[[dict[str, Any]], tuple[list[dict[str, Any]], bool]]


# The conversational row formats, in detection order (`text` is the plain-document format, not listed). The manifest,
# `--dataset-format` and both sides' checks take their names from here.
ROW_FORMATS: dict[str, RowFormat] = {
    "messages": RowFormat(("messages",), _messages_row),
    "prompt_completion": RowFormat(("prompt", "completion"), _prompt_completion_row),
}


def row_messages(row: dict[str, Any], row_format: str) -> tuple[list[dict[str, Any]], bool]:
    """(messages, plain) of one dataset row of a `ROW_FORMATS` format. Raises BadRow."""
    messages, plain = ROW_FORMATS[row_format].messages(row)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant message (nothing to learn from)")
    return messages, plain


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _pieces(msg: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(field, text, offset) of each piece of a message's content, in rendering order. Inline reasoning
    (`<think>...</think>` opening an assistant content) is field "reasoning_content" with offsets into the CONTENT
    (see `field_text`)."""
    content = msg[CONTENT]
    if REASONING in msg:
        return [(REASONING, msg[REASONING], 0), (CONTENT, content, 0)]
    if msg["role"] == "assistant" and _THINK_CLOSE in content:
        close = content.index(_THINK_CLOSE)
        open_at = content.find(_THINK_OPEN, 0, close)
        start = 0 if open_at < 0 else open_at + len(_THINK_OPEN)
        return [(REASONING, content[start:close], start), (CONTENT, content[close + len(_THINK_CLOSE):],
                                                             close + len(_THINK_CLOSE))]
    return [(CONTENT, content, 0)]


def field_text(msg: dict[str, Any], field: str) -> str:
    """The string a span's offsets index: the field itself, or the content for inline reasoning."""
    return msg[field] if field in msg else msg[CONTENT]


def _find(text: str, piece: str, cursor: int) -> tuple[int, int, int] | None:
    """(start, end, offset into piece) of `piece` in text at or after cursor: verbatim, else its ends stripped of
    newlines, else of all whitespace (what templates do to content)."""
    for variant in (piece, piece.strip("\n"), piece.strip()):
        if not variant:
            continue
        at = text.find(variant, cursor)
        if at >= 0:
            return at, at + len(variant), piece.index(variant)
    return None


def render(tokenizer: Any, messages: list[dict[str, Any]], *, template: str | None = None,
           kwargs: dict[str, Any] | None = None, plain: bool = False, eos_text: str = "") -> Rendered:
    """Render `messages` and locate their content; raises RenderError (the template raised, or an assistant
    answer is not in the rendered text). `plain`: prompt + completion + `eos_text`, no template."""
    if plain:
        prompt, completion = messages[0][CONTENT], messages[1][CONTENT]
        end = len(prompt) + len(completion)
        spans = [s for s in ((0, CONTENT, 0, len(prompt), 0), (1, CONTENT, len(prompt), end, 0)) if s[2] < s[3]]
        return Rendered(prompt + completion + eos_text, messages, spans, [(len(prompt), end)], plain=True)
    kwargs = kwargs or {}

    def apply(msgs: list[dict[str, Any]], generation: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation,
                                             chat_template=template, **kwargs)

    try:
        text = apply(messages, False)
    except Exception as err:  # jinja raises many kinds (TemplateError, TypeError, a template's raise_exception)
        raise RenderError(f"the chat template raised {type(err).__name__}: {err}") from err
    spans: list[tuple[int, str, int, int, int]] = []
    regions: list[tuple[int, int]] = []
    cursor = 0
    for index, msg in enumerate(messages):
        pieces = _pieces(msg)
        header_end = None
        if msg["role"] == "assistant" and index > 0:
            try:
                prefix = apply(messages[:index], True)
                header_end = len(prefix) if text.startswith(prefix) and len(prefix) >= cursor else None
            except Exception:  # noqa: BLE001 - a template that cannot render a prefix: fall back to the spans
                header_end = None
        search_from = cursor if header_end is None else header_end
        found = []
        for number, (field, piece, offset) in enumerate(pieces):
            hit = _find(text, piece, search_from) if piece.strip() else None
            if hit is None:
                if msg["role"] == "assistant" and number == len(pieces) - 1 and piece.strip():
                    raise RenderError(f"message {index} (assistant): its content is not in the text the chat template "
                                      "renders (the template rewrites it), so its tokens cannot be masked exactly")
                continue  # reasoning a template drops, empty content, or user text a template rewrites
            start, end, inner = hit
            found.append((index, field, start, end, offset + inner))
            search_from = end
        spans.extend(found)
        if found:
            cursor = found[-1][3]
        if msg["role"] == "assistant" and found:
            start = found[0][2] if header_end is None else min(header_end, found[0][2])
            regions.append((start, found[-1][3]))
    return Rendered(text, messages, spans, regions)


def token_masks(offsets: np.ndarray, regions: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(assistant [n], targets [n]) bool for tokens with character `offsets` [n, 2]: a token is assistant content when
    it overlaps a region, and so is the first token starting at or after a region's end (the end-of-turn token);
    position t stores targets when token t + 1 is assistant content."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    assistant = np.zeros(len(offsets), dtype=bool)
    for lo, hi in regions:
        assistant |= (starts < hi) & (ends > lo)
        after = np.nonzero(starts >= hi)[0]
        if after.size:
            assistant[after[0]] = True
    targets = np.zeros_like(assistant)
    targets[:-1] = assistant[1:]
    return assistant, targets
