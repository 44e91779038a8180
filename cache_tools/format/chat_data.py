"""Conversational dataset input: rows in TRL's formats (`messages`, `prompt` + `completion`) from any `--dataset`
source, rendered with a chat template (`conversations.render`), tokenised, and given per-token assistant and target
masks, as `packing.Piece`s for `packing.pack_conversations`. Malformed rows are skipped, counted and named (file and
row) one line each; `ChatStats` keeps the counts for the build's report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import conversations
from cache_tools.format.errors import DatasetInputError
from cache_tools.format.packing import Piece, eos_of, require_fast
from cache_tools.format.text_data import dataset_rows, open_dataset, row_place, warn

ROW_FORMATS = ("auto", "text", *conversations.ROW_FORMATS)  # --dataset-format


@dataclass
class ChatStats:
    rows: int = 0
    bad: int = 0
    first_bad: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # "split" / "skipped" long conversations
    assistant_tokens: int = 0
    tokens: int = 0


def dataset_columns(spec: str, split: str, streaming: bool) -> list[str]:
    ds = open_dataset(spec, split, streaming)
    columns = getattr(ds, "column_names", None)
    if columns is None:  # some streaming datasets only know their columns from a row
        first = next(iter(ds), None)
        columns = sorted(first) if isinstance(first, dict) else []
    return list(columns)


def resolve_row_format(requested: str, spec: str, split: str, streaming: bool) -> str:
    """`--dataset-format auto` -> the format the columns say (see `conversations.detect_row_format`)."""
    if requested not in ROW_FORMATS:
        raise DatasetInputError(f"--dataset-format {requested}: use one of {', '.join(ROW_FORMATS)}")
    columns = dataset_columns(spec, split, streaming)
    found = conversations.detect_row_format(columns)
    if requested == "auto":
        return found
    needs = conversations.ROW_FORMATS[requested].columns if requested != "text" else ()
    missing = [c for c in needs if c not in columns]
    if missing:
        raise DatasetInputError(f"--dataset-format {requested}: dataset {spec} has no column {missing[0]!r} (columns: "
                                f"{columns}); pass the right --dataset-format or dataset")
    return requested


def needs_template(spec: str, split: str, streaming: bool, row_format: str) -> bool:
    """Conversations are rendered with a chat template; prompt/completion rows of plain strings are not (TRL's
    standard format: prompt + completion + EOS), judged from the first row."""
    if row_format != "prompt_completion":
        return True
    first = next(iter(open_dataset(spec, split, streaming)), None)
    return not (isinstance(first, dict) and isinstance(first.get("prompt"), str))


def parse_template_kwargs(value: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(value or "{}")
    except json.JSONDecodeError as err:
        raise DatasetInputError(f"--chat-template-kwargs {value!r}: not JSON ({err.msg}); pass an object such as "
                                "'{\"enable_thinking\": false}'") from err
    if not isinstance(kwargs, dict):
        raise DatasetInputError(f"--chat-template-kwargs {value!r}: must be a JSON object")
    return kwargs


def chat_template(tokenizer: Any, template_file: str | None) -> str:
    """The template to render with: --chat-template FILE, else the tokenizer's own; neither is a one-line error."""
    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise DatasetInputError(f"--chat-template {template_file}: no such file; pass a Jinja template file")
        return path.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise DatasetInputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; pass "
                                "--chat-template FILE (a Jinja chat template) to render conversations")
    return str(template)


def conversation_pieces(tokenizer: Any, spec: str, *, split: str, row_format: str, template: str | None,
                        kwargs: dict[str, Any], max_samples: int | None, streaming: bool,
                        stats: ChatStats) -> Iterator[Piece]:
    """One `Piece` per good row (doc_index = row number); bad rows are warned about one line each and counted."""
    require_fast(tokenizer)
    _, eos_text = eos_of(tokenizer)
    ds = open_dataset(spec, split, streaming)
    for index, row in dataset_rows(ds, spec, max_samples):
        stats.rows += 1
        try:
            messages, plain = conversations.row_messages(row, row_format)
            rendered = conversations.render(tokenizer, messages, template=template, kwargs=kwargs, plain=plain,
                                            eos_text=eos_text, tools=conversations.row_tools(row))
            piece = _piece(tokenizer, index, rendered)
        except (conversations.BadRow, conversations.RenderError) as err:
            stats.bad += 1
            # Naming the file line rescans the file: past the first 100 bad rows, the row number is named.
            where = f"--dataset {spec}: {row_place(spec, index) if stats.bad <= 100 else f'row {index + 1}'}"
            if os.environ.get("RANK", "0") == "0":  # every rank reads every row; one of them names the bad ones
                warn(f"{where}: skipped, {err}")
            if len(stats.first_bad) < 3:
                stats.first_bad.append(f"{where}: {err}")
        else:
            stats.assistant_tokens += int(piece.assistant.sum())
            stats.tokens += len(piece.ids)
            yield piece


def _piece(tokenizer: Any, index: int, rendered: conversations.Rendered) -> Piece:
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if not ids:
        raise conversations.BadRow("renders to no tokens")
    assistant, targets = conversations.token_masks(np.asarray(offsets, dtype=np.int64), rendered.regions)
    if not assistant.any():
        raise conversations.BadRow("no assistant token after rendering (empty answers)")
    record_messages = [dict(m) for m in rendered.messages]
    if rendered.plain:
        record_messages = [{**m, "plain": True} for m in record_messages]
    return Piece(index, rendered.text, ids, offsets, assistant=assistant, targets=targets,
                 messages=record_messages, spans=rendered.spans, tools=rendered.tools)
