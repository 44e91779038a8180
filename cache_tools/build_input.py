"""What a build reads: plain text or conversations (row format from the columns or `--dataset-format`), packed into
windows, and the manifest records that describe it (row format, chat template hash + kwargs, packing mode, whether
targets are assistant-only). Dataset errors surface here, before the teacher loads or anything is written."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cache_tools.build_options import BuildOptions
from cache_tools.format import chat_data, conversations, packing, schema, text_data
from cache_tools.format.errors import BuildError


@dataclass
class InputPlan:
    row_format: str  # schema.ROW_FORMATS
    template: str | None  # the chat template conversations are rendered with
    kwargs: dict[str, Any]
    packing: str  # schema.PACKING_MODES
    assistant_only: bool
    stats: chat_data.ChatStats

    @property
    def conversational(self) -> bool:
        return self.row_format != "text"


def plan_input(opts: BuildOptions, tokenizer: Any) -> InputPlan:
    """Resolve the row format, template and packing (one-line errors naming the flag)."""
    row_format = chat_data.resolve_row_format(opts.dataset_format, opts.dataset, opts.split, opts.streaming)
    kwargs = chat_data.parse_template_kwargs(opts.chat_template_kwargs)
    if row_format == "text":
        if opts.chat_template or kwargs:
            raise BuildError(f"--chat-template/--chat-template-kwargs: dataset {opts.dataset} is plain text (no "
                             "messages or prompt/completion columns); drop them or pass --dataset-format")
        # Isolated by default: measured better for students than cross-document windows (docs/RESULTS.md).
        mode = "isolated" if opts.packing == "auto" else opts.packing
        return InputPlan(row_format, None, {}, mode, False, chat_data.ChatStats())
    if opts.packing == "cross_document":
        raise BuildError("--packing cross_document: conversations are always packed isolated (a conversation never "
                         "attends to another); drop the flag")
    template = None
    if opts.chat_template or chat_data.needs_template(opts.dataset, opts.split, opts.streaming, row_format):
        template = chat_data.chat_template(tokenizer, opts.chat_template)
    return InputPlan(row_format, template, kwargs, "isolated", not opts.all_positions, chat_data.ChatStats())


def windows(opts: BuildOptions, tokenizer: Any, plan: InputPlan, rows: schema.RowsInfo | None = None
            ) -> Iterator[packing.Window]:
    """Packed windows; the first is produced here so dataset errors and empty datasets fail before any output.
    `rows` receives the dataset's row counts once every window was taken (conversations: with `report`)."""
    # text_data / chat_data raise their own one-line UserErrors naming the spec and the fix.
    if plan.conversational:
        pieces = chat_data.conversation_pieces(
            tokenizer, opts.dataset, split=opts.split, row_format=plan.row_format, template=plan.template,
            kwargs=plan.kwargs, max_samples=opts.max_samples, streaming=opts.streaming, stats=plan.stats)
        stream = packing.pack_conversations(pieces, opts.max_length, long=opts.long_conversations,
                                            counts=plan.stats.counts)
    else:
        docs = text_data.load_documents(opts.dataset, split=opts.split, text_column=opts.text_column,
                                        max_samples=opts.max_samples, streaming=opts.streaming, rows=rows)
        stream = text_data.pack_windows(tokenizer, docs, opts.max_length)
    first = next(stream, None)
    if first is None:
        raise BuildError(_nothing_left(opts, plan))
    return itertools.chain([first], stream)


def _nothing_left(opts: BuildOptions, plan: InputPlan) -> str:
    if not plan.conversational:
        return (f"--dataset {opts.dataset}: no text (every row of column {opts.text_column!r} in split {opts.split!r} "
                "is empty); check --dataset/--split/--text-column")
    stats = plan.stats
    if stats.bad:
        return (f"--dataset {opts.dataset}: none of its {stats.rows} conversations is usable ({stats.bad} malformed; "
                f"first: {stats.first_bad[0]}); fix the rows or pass the right --dataset-format/--chat-template")
    if stats.counts.get("skipped"):
        return (f"--dataset {opts.dataset}: every conversation is longer than --max-length {opts.max_length} and "
                "--long-conversations skip drops them; raise --max-length or pass --long-conversations split")
    return f"--dataset {opts.dataset}: no rows in split {opts.split!r}; check --dataset/--split"


def dataset_info(opts: BuildOptions, plan: InputPlan) -> schema.DatasetInfo:
    return schema.DatasetInfo(
        spec=opts.dataset, split=opts.split, text_column=opts.text_column, max_samples=opts.max_samples,
        streaming=opts.streaming, fingerprint=text_data.dataset_fingerprint(opts.dataset, split=opts.split),
        row_format=plan.row_format,
        chat_template_hash=conversations.template_hash(plan.template) if plan.template else "",
        chat_template_kwargs=json.dumps(plan.kwargs, sort_keys=True, separators=(",", ":")),
        long_conversations=opts.long_conversations)


def report(plan: InputPlan, rows: schema.RowsInfo) -> dict[str, Any]:
    """Counts of the conversational input (printed to the console; part of the build's result); `rows` records the
    rows read and the malformed ones skipped."""
    if not plan.conversational:
        return {}
    stats = plan.stats
    rows.read, rows.without_text = stats.rows, stats.bad
    rows.first_without_text = stats.first_bad[0] if stats.first_bad else ""
    result = {"rows": stats.rows, "malformed_rows": stats.bad, "long_split": stats.counts.get("split", 0),
              "long_skipped": stats.counts.get("skipped", 0),
              "assistant_fraction": stats.assistant_tokens / max(1, stats.tokens)}
    print(f"cache_tools: {stats.rows} conversations: {stats.bad} malformed (skipped, named above), "
          f"{result['long_split']} longer than --max-length split, {result['long_skipped']} skipped; "
          f"{100 * result['assistant_fraction']:.1f}% of tokens are assistant content", file=sys.stderr)
    return result
