"""Conversational dataset rows in TRL's formats, checked: ``messages`` (a list of {role, content[, reasoning_content,
tool_calls, name, tool_call_id]}), ``prompt_completion`` (``prompt`` + ``completion``, each a string or a list of
messages) and the optional ``tools`` column (function schemas the chat template renders). `format.conversations`
renders what these functions return."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CONTENT, REASONING, TOOL_CALLS, TOOLS = "content", "reasoning_content", "tool_calls", "tools"
_TOOL_KEYS = ("name", "tool_call_id")  # string keys templates read from tool messages


class BadRow(ValueError):
    """A dataset row that cannot be a conversation (the message names what is wrong; the caller adds file/row)."""


def detect_row_format(columns: list[str]) -> str:
    """TRL's naming: the first of `ROW_FORMATS` whose columns are all there (`messages`, or `prompt` + `completion`),
    else plain text."""
    return next((name for name, fmt in ROW_FORMATS.items() if all(c in columns for c in fmt.columns)), "text")


def check_messages(value: Any, what: str = "messages") -> list[dict[str, Any]]:
    """The messages of a row, each {role, content[, reasoning_content, tool_calls, name, tool_call_id]} with string
    values (an assistant message with `tool_calls` may have no content); raises BadRow."""
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
        calls = _tool_calls(msg.get(TOOL_CALLS), f"{what}[{i}] ({role})") if role == "assistant" else None
        if content is None and calls:
            content = ""  # a turn that only calls tools
        if content is None:
            raise BadRow(f"{what}[{i}] ({role}) has no content")
        if not isinstance(content, str):
            raise BadRow(f"{what}[{i}] ({role}) content is {type(content).__name__}, not a string")
        clean = {"role": role, CONTENT: content}
        for key in (REASONING, *_TOOL_KEYS):
            if msg.get(key) is not None:
                if not isinstance(msg[key], str):
                    raise BadRow(f"{what}[{i}] ({role}) {key} is {type(msg[key]).__name__}, not a string")
                clean[key] = msg[key]
        if calls:
            clean[TOOL_CALLS] = calls
        out.append(clean)
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]] | None:
    """An assistant message's `tool_calls` (OpenAI/TRL shape: [{type, function: {name, arguments}}], or the flat
    {name, arguments}), passed to the template as given; raises BadRow when a call has no string name."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRow(f"{where} tool_calls is {type(value).__name__}, not a list")
    for j, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRow(f"{where} tool_calls[{j}] has no function name (expected {{type, function: {{name, "
                         "arguments}}}})")
    return value


def row_tools(row: dict[str, Any]) -> list[Any] | None:
    """The row's `tools` column (function schemas the template renders, as TRL passes them), a list or a JSON string
    of one; None when absent. Raises BadRow."""
    tools = row.get(TOOLS)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise BadRow(f"tools is a string but not JSON ({err.msg})") from err
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow(f"tools is {type(tools).__name__}, not a list of function schemas")
    return tools


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
