"""`build-cache` on conversational datasets (tiny teacher, the suite's tokenizer, a ChatML template file): the cache
records the format 3 fields, assistant-only caches store targets exactly where the next token is assistant content
and read back equal to an every-position build there, long conversations are split or skipped (counted), and plain
text keeps its layout with segment lengths split at EOS."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cache_tools.cli import main
from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader
from cache_tools.format.verify import verify_cache
from tests.chat_fixtures import chatml_assistant_mask, make_conversations, write_jsonl

# ChatML with the suite tokenizer's EOS (one special token) closing each turn, as <|im_end|> is one token in Qwen3
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FLAGS = ("--max-length", "256", "--top-k", "8", "--batch-size", "4", "--no-progress")


@pytest.fixture(scope="module")
def chat_inputs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("chat_inputs")
    template = root / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    rows = make_conversations(corpus, 10, seed=2, reasoning=False, max_turns=2, context=(3, 12))
    return root, template, write_jsonl(root / "chat.jsonl", rows)


def _build(teacher_dir, dataset, out, *extra):
    argv = ["build-cache", "--teacher", str(teacher_dir), "--dataset", str(dataset), "--output", str(out), *FLAGS,
            *extra]
    return main(argv)


@pytest.fixture(scope="module")
def chat_caches(tmp_path_factory, teacher_dir, chat_inputs):
    root, template, data = chat_inputs
    out = {}
    for name, extra in (("assistant", ()), ("all", ("--all-positions",)),
                        ("compact", ("--encoding", "compact"))):
        out[name] = root / name
        assert _build(teacher_dir, data, out[name], "--chat-template", str(template), *extra) == 0
    return out


def test_conversational_cache_fields(chat_caches, tokenizer):
    cache = chat_caches["assistant"]
    assert verify_cache(cache) == []
    reader = TeacherCacheReader(cache)
    m = reader.manifest
    assert (m.format_version, m.packing, m.dataset.row_format, m.targets.assistant_only) == (3, "isolated",
                                                                                             "messages", True)
    assert len(m.dataset.chat_template_hash) == 64 and json.loads(m.dataset.chat_template_kwargs) == {}
    packed, whole, carried = 0, 0, {}
    for i in range(len(reader)):
        seq = reader[i]
        assert int(seq.segment_lengths.sum()) == seq.length and len(seq.conversation) == len(seq.segment_lengths)
        packed += len(seq.segment_lengths) > 1
        bounds = np.concatenate([[0], np.cumsum(seq.segment_lengths)])
        for record, lo, hi in zip(seq.conversation, bounds[:-1], bounds[1:], strict=True):
            c0, c1 = int(seq.offsets[lo, 0]), int(seq.offsets[hi - 1, 1])
            text, offsets, mask = seq.text[c0:c1], seq.offsets[lo:hi] - c0, seq.assistant_mask[lo:hi]
            if text.startswith("<|im_start|>") and text.endswith("<|endoftext|>\n"):
                # independent computation over the piece's own text (a whole conversation; tokens tile the text)
                assert np.array_equal(mask, chatml_assistant_mask(text, offsets, "<|endoftext|>"))
                whole += 1
            else:  # one conversation over several windows: its text and mask, carried across, are checked whole
                done_text, done_offsets, done_mask = carried.get(record["row"], ("", np.zeros((0, 2), int),
                                                                                 np.zeros(0, bool)))
                carried[record["row"]] = (done_text + text, np.concatenate([done_offsets, offsets + len(done_text)]),
                                          np.concatenate([done_mask, mask]))
    assert packed and whole >= 3  # short conversations share windows
    for text, offsets, mask in carried.values():
        assert np.array_equal(mask, chatml_assistant_mask(text, offsets, "<|endoftext|>"))


@pytest.mark.parametrize("other", ["all", "compact"])
def test_assistant_only_targets_equal_every_position_build(chat_caches, other):
    mine, theirs = TeacherCacheReader(chat_caches["assistant"]), TeacherCacheReader(chat_caches[other])
    assert len(mine) == len(theirs)
    tolerance = 0.0 if other == "all" else 0.05  # compact quantises log-probs
    for i in range(len(mine)):
        a, b = mine[i], theirs[i]
        assert np.array_equal(a.input_ids, b.input_ids)
        keep = a.target_mask
        assert np.array_equal(keep, b.target_mask if other == "compact" else keep)
        order_a, order_b = np.argsort(a.topk_ids[keep], -1), np.argsort(b.topk_ids[keep], -1)  # encodings order ties
        assert np.array_equal(np.take_along_axis(a.topk_ids[keep], order_a, -1),
                              np.take_along_axis(b.topk_ids[keep], order_b, -1))
        diff = (np.take_along_axis(a.topk_logprobs[keep], order_a, -1)
                - np.take_along_axis(b.topk_logprobs[keep], order_b, -1))
        assert np.abs(diff).max() <= tolerance
    assert verify_cache(chat_caches[other]) == []


def test_inspect_reports_targets_saved(chat_caches, capsys):
    assert main(["inspect", str(chat_caches["assistant"])]) == 0
    out = capsys.readouterr().out
    saved = re.search(r"positions_with_targets\s+(\d+) of (\d+)", out)
    assert saved and int(saved.group(1)) < int(saved.group(2))
    from cache_tools.inspect_cache import cache_summary

    # fp16 too: target arrays of an assistant-only cache allocate only the chunks holding stored positions
    mine, every = (cache_summary(chat_caches[name])["bytes_per_token_by_dataset"] for name in ("assistant", "all"))
    assert mine["topk_ids"] < 0.8 * every["topk_ids"] and mine["topk_logprobs"] < 0.8 * every["topk_logprobs"]


@pytest.mark.parametrize("mode, split, skipped", [("split", 1, 0), ("skip", 0, 1)])
def test_long_conversations_split_or_skipped(tmp_path, teacher_dir, chat_inputs, mode, split, skipped, capsys):
    _, template, _ = chat_inputs
    long_row = {"messages": [{"role": "user", "content": "tell me " * 150},
                             {"role": "assistant", "content": "a long answer " * 100}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = write_jsonl(tmp_path / "long.jsonl", [short, long_row, short])
    capsys.readouterr()
    assert _build(teacher_dir, data, tmp_path / "c", "--chat-template", str(template),
                  "--long-conversations", mode) == 0
    err = capsys.readouterr().err
    assert f"{split} longer than --max-length split, {skipped} skipped" in err
    reader = TeacherCacheReader(tmp_path / "c")
    rows = [p["row"] for i in range(len(reader)) for p in reader[i].conversation]
    assert rows.count(1) == (0 if skipped else len([r for r in rows if r == 1])) and rows.count(0) == 1
    if split:
        assert rows.count(1) >= 2  # one conversation over several windows, masks carried
        assert verify_cache(tmp_path / "c") == []


def test_prompt_completion_strings_need_no_template(tmp_path, teacher_dir):
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"question {i} is", "completion": f" answer {i}"}
                                                for i in range(6)])
    assert _build(teacher_dir, data, tmp_path / "c") == 0
    reader = TeacherCacheReader(tmp_path / "c")
    assert reader.manifest.dataset.row_format == "prompt_completion"
    seq = reader[0]
    picked = "".join(seq.text[s:e] for (s, e), a in zip(seq.offsets, seq.assistant_mask, strict=True) if a)
    assert picked.startswith(" answer 0")


def test_plain_text_keeps_its_layout_and_records_segments(tmp_path, teacher_dir, text_file, tokenizer):
    assert _build(teacher_dir, text_file, tmp_path / "text", "--max-samples", "12") == 0
    reader = TeacherCacheReader(tmp_path / "text")
    m = reader.manifest
    assert (m.packing, m.dataset.row_format, m.targets.assistant_only) == ("isolated", "text", False)
    assert schema.ASSISTANT_MASK not in schema.dataset_names(m) and schema.TARGET_MASK not in schema.dataset_names(m)
    eos = tokenizer.eos_token_id
    for i in range(len(reader)):
        seq = reader[i]
        assert seq.assistant_mask is None and seq.target_mask.all() and seq.conversation is None
        ends = np.cumsum(seq.segment_lengths) - 1
        assert (seq.input_ids[ends[:-1]] == eos).all()  # a piece ends with the EOS that closes its document
    assert _build(teacher_dir, text_file, tmp_path / "cross", "--max-samples", "12", "--packing",
                  "cross_document") == 0
    cross = TeacherCacheReader(tmp_path / "cross")
    assert cross.manifest.packing == "cross_document"
    multi = next(i for i in range(len(reader)) if len(reader[i].segment_lengths) > 1)
    a, b = cross[multi], reader[multi]
    assert np.array_equal(a.input_ids, b.input_ids)
    first = int(a.segment_lengths[0])
    assert np.array_equal(a.topk_logprobs[:first], b.topk_logprobs[:first])  # the first piece sees the same context
    assert not np.array_equal(a.topk_logprobs[first:], b.topk_logprobs[first:])  # later ones no longer see it


@pytest.mark.parametrize("name, encoding", [("assistant", "compact"), ("compact", "fp16"), ("compact", "compact")])
def test_convert_keeps_conversational_fields(chat_caches, tmp_path, name, encoding):
    """`cache_tools convert` on assistant-only conversational caches: masks, segments, conversation records, tails
    and the targets at every stored position survive (fp16 -> compact quantises the log-probs only; compact ->
    compact keeps them exactly)."""
    from cache_tools.convert import convert_cache

    out = tmp_path / "converted"
    convert_cache(chat_caches[name], out, encoding)
    assert verify_cache(out) == []
    a, b = TeacherCacheReader(chat_caches[name]), TeacherCacheReader(out)
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for field in ("input_ids", "assistant_mask", "target_mask", "segment_lengths", "tail_logprob", "offsets"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)
        assert x.conversation == y.conversation
        np.testing.assert_array_equal(np.sort(x.topk_ids, -1), np.sort(y.topk_ids, -1))
        if name == encoding == "compact":
            np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)


def test_resume_rebuilds_a_lost_shard_byte_identically(tmp_path, teacher_dir, chat_inputs):
    import shutil

    from cache_testing import assert_same_cache

    _, template, data = chat_inputs
    out = tmp_path / "c"
    flags = ("--chat-template", str(template), "--shard-size", "2", "--max-samples", "6")
    assert _build(teacher_dir, data, out, *flags) == 0
    clean = tmp_path / "clean"
    shutil.copytree(out, clean)
    (out / schema.shard_name(1)).unlink()
    (out / schema.shard_sidecar_name(1)).unlink()
    assert _build(teacher_dir, data, out, *flags, "--resume") == 0
    assert_same_cache(out, clean)
    assert verify_cache(out) == []
