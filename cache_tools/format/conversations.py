"""Conversations (TRL's dataset formats) rendered with a chat template, with exact character spans of every message's
content and the assistant regions, found WITHOUT `{% generation %}` markers: the teacher side builds its cache with
this module and a student with another template re-renders the same messages with it.

Row formats (`format.chat_rows`): ``messages``, ``prompt_completion`` (``prompt`` + ``completion``, each a string or
a list of messages: plain strings are concatenated without a template, as TRL's standard format; lists are rendered
as one conversation), with an optional ``tools`` column passed to the template, and ``text`` (plain documents, not
handled here).

How spans are found: render the whole conversation once; then, message by message in order, search the rendered text
(from where the previous message's content ended) for each piece of the message's content, verbatim, or, failing
that, with the newlines (then whitespace) at its ends stripped, as templates do; the span records its offset into the
content so it is exact either way. Reasoning (``reasoning_content``, or ``<think>...</think>`` at the start of an
assistant content, which templates such as Qwen3's split off) is its own piece: a template may drop it from earlier
turns (then it has no span). An assistant message whose answer cannot be found is refused (`RenderError`) rather than
given a mask that might be shifted. An assistant region starts where the template's generation prompt for that turn
ends (when rendering the preceding messages with ``add_generation_prompt=True`` gives a prefix of the full text: it
then includes template text the model generates, such as Qwen3's think block) or else at its first content span, and
ends at its last content span; the token after a region (the end-of-turn token) is assistant content too. What the
template renders for an assistant message's ``tool_calls`` is assistant output as well (the model generates it):
found as the one block by which the text differs from a rendering without them, it extends that message's region."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_tools.format.chat_rows import (  # noqa: F401 - the row checks are part of this module's interface
    CONTENT,
    REASONING,
    ROLES,
    ROW_FORMATS,
    TOOL_CALLS,
    TOOLS,
    BadRow,
    RowFormat,
    check_messages,
    detect_row_format,
    row_messages,
    row_tools,
)

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


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
    tools: list[Any] | None = None  # the row's tool schemas, rendered by the template


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
           kwargs: dict[str, Any] | None = None, plain: bool = False, eos_text: str = "",
           tools: list[Any] | None = None) -> Rendered:
    """Render `messages` (with `tools`, when given) and locate their content; raises RenderError (the template
    raised, or an assistant answer or tool call is not in the rendered text). `plain`: prompt + completion +
    `eos_text`, no template."""
    if plain:
        prompt, completion = messages[0][CONTENT], messages[1][CONTENT]
        end = len(prompt) + len(completion)
        spans = [s for s in ((0, CONTENT, 0, len(prompt), 0), (1, CONTENT, len(prompt), end, 0)) if s[2] < s[3]]
        return Rendered(prompt + completion + eos_text, messages, spans, [(len(prompt), end)], plain=True)
    kwargs = {**(kwargs or {}), **({TOOLS: tools} if tools else {})}

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
        calls = _tool_call_text(apply, text, messages, index, search_from)
        if found:
            cursor = found[-1][3]
        if calls is not None:
            cursor = max(cursor, calls[1])
        if msg["role"] == "assistant" and (found or calls):
            bounds = [b for b in ([found[0][2], found[-1][3]] if found else []) + list(calls or ())]
            start = min(bounds) if header_end is None else min(header_end, *bounds)
            regions.append((start, max(bounds)))
    return Rendered(text, messages, spans, regions, tools=tools)


def _tool_call_text(apply: Callable[[list[dict[str, Any]], bool], str], text: str, messages: list[dict[str, Any]],
                    index: int, anchor: int) -> tuple[int, int] | None:
    """(start, end) in `text` of what the template renders for message `index`'s tool calls (assistant output, so
    inside its region), found by rendering the conversation once more without them: the difference must be one
    inserted block. Where that block could sit at several places (its first characters repeat the ones after it),
    the one nearest after `anchor` (the end of the message's content, or its header) is taken, as templates put
    tool calls after the content. None: no tool calls, or a template that does not render them."""
    msg = messages[index]
    if not msg.get(TOOL_CALLS):
        return None
    without = [m if i != index else {k: v for k, v in m.items() if k != TOOL_CALLS} for i, m in enumerate(messages)]
    try:
        other = apply(without, False)
    except Exception as err:  # noqa: BLE001 - reported as the row's render error
        raise RenderError(f"the chat template raised {type(err).__name__} without message {index}'s tool calls: "
                          f"{err}") from err
    size = len(text) - len(other)
    if size == 0 and text == other:
        return None
    prefix = next((i for i, (a, b) in enumerate(zip(text, other, strict=False)) if a != b), len(other))
    suffix = next((i for i, (a, b) in enumerate(zip(reversed(text), reversed(other), strict=False)) if a != b),
                  len(other))
    latest, earliest = min(prefix, len(other)), max(len(other) - suffix, 0)
    if size <= 0 or earliest > latest:
        raise RenderError(f"message {index} (assistant): the chat template renders its tool calls by changing other "
                          "text, so their tokens cannot be masked exactly")
    at = max(earliest, anchor) if latest >= anchor else latest
    if latest < anchor and earliest != latest:
        raise RenderError(f"message {index} (assistant): its tool calls render before its content at an ambiguous "
                          "place, so their tokens cannot be masked exactly")
    return at, at + size


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
