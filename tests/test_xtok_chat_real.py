"""Cross-tokenizer, cross-template students on the real tokenizers: teacher = Qwen3 (its real thinking template),
student = SmolLM2 (ChatML with a default system turn). The two render a conversation to different text; KD pairs
positions only where both have consumed the same message content (never markup), and the student's masks equal an
independent computation from its own rendering."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SHARED

QWEN, SMOL = SHARED / "tokenizers" / "qwen3", SHARED / "tokenizers" / "smollm2"
pytestmark = pytest.mark.skipif(not (QWEN.is_dir() and SMOL.is_dir()), reason="../shared/tokenizers not present")
pytest.importorskip("cache_tools.format.conversations")  # the teacher side's renderer and span finder

CONVERSATIONS = [
    [{"role": "user", "content": "What does len() return for a list?"},
     {"role": "assistant", "content": "It returns the number of items in the list.",
      "reasoning_content": "The user asks about len on lists."},
     {"role": "user", "content": "And for a dict?"},
     {"role": "assistant", "content": "For a dict it returns the number of keys, café ☕ included."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name a sorting function."},
     {"role": "assistant", "content": "<think>\nsorted() is the obvious one.\n</think>\n\nUse sorted(iterable)."}],
]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN), AutoTokenizer.from_pretrained(SMOL)


def teacher_window(teacher, conversations, K: int = 8, seed: int = 0):
    """A conversational window as the teacher side packs it (isolated pieces, no separator): rendered with the
    teacher's template, tokenised, masks and spans from `cache_tools.format.conversations`, random valid targets."""
    from cache_tools.format.conversations import render, token_masks

    rng = np.random.default_rng(seed)
    ids, offsets, assistant, records, lengths, text = [], [], [], [], [], ""
    for row, messages in enumerate(conversations):
        rendered = render(teacher, messages)
        enc = teacher(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64)
        mask, _ = token_masks(offs, rendered.regions)
        base = len(text)
        ids.append(np.asarray(enc["input_ids"], np.int64))
        offsets.append(offs + base)
        assistant.append(mask)
        lengths.append(len(enc["input_ids"]))
        records.append({"row": row, "messages": rendered.messages,
                        "spans": [[m, f, s + base, e + base, o] for m, f, s, e, o in rendered.spans]})
        text += rendered.text
    ids, assistant = np.concatenate(ids), np.concatenate(assistant)
    n = ids.shape[0]
    target = np.zeros(n, bool)
    target[:-1] = assistant[1:]
    logits = rng.normal(size=(n, K))
    logp = (logits - np.log(np.exp(logits).sum(1, keepdims=True) * 1.1)).astype(np.float32)
    return SimpleNamespace(index=0, input_ids=ids, offsets=np.concatenate(offsets).astype(np.int32),
                           topk_ids=rng.integers(0, len(teacher), size=(n, K)), topk_logprobs=logp,
                           tail_logprob=np.full(n, np.log(0.1 / 1.1), np.float32),
                           pooled_hidden=np.zeros((1, 4), np.float16), text=text, doc_index=0,
                           segment_lengths=np.asarray(lengths, np.int32), assistant_mask=assistant,
                           target_mask=target, conversation=records, length=n)


@pytest.fixture(scope="module")
def builder(tokenizers, tmp_path_factory):
    from cache_tools.format import schema
    from distill.data.xtok.pipeline import CrossTokenizerTargets

    teacher, student = tokenizers
    manifest = schema.CacheManifest(
        complete=True, tokenizer=schema.TokenizerInfo(content_hash=schema.tokenizer_hash(teacher),
                                                      vocab_size=len(teacher),
                                                      special_ids={"eos": teacher.eos_token_id}),
        targets=schema.TargetsInfo(top_k=8), max_length=512)
    manifest.dataset.row_format = "messages"
    return CrossTokenizerTargets(manifest, teacher, student, cache_dir=tmp_path_factory.mktemp("maps"),
                                 isolated=True, assistant_only=True, use_store=False)


def independent_student(student, messages):
    """The student's rendering, its tokens, and its assistant tokens computed with plain str.find: each assistant
    content located in ChatML, tokens overlapping it plus the first token after it (<|im_end|>)."""
    text = student.apply_chat_template(messages, tokenize=False)
    enc = student(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
    spans, cursor = [], 0
    for msg in messages:
        at = text.find(msg["content"], cursor)
        assert at >= 0
        spans.append((msg["role"], at, at + len(msg["content"])))
        cursor = at + len(msg["content"])
    assistant = np.zeros(len(offsets), bool)
    for role, a, b in spans:
        if role == "assistant":
            assistant |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
            assistant[np.flatnonzero(offsets[:, 0] >= b)[0]] = True
    return text, np.asarray(enc["input_ids"]), offsets, assistant, spans


def test_masks_equal_an_independent_computation_and_kd_only_on_content(tokenizers, builder):
    teacher, student = tokenizers
    seq = teacher_window(teacher, CONVERSATIONS)
    out = builder(seq)
    assert "SmolLM" in builder.renderer.window(seq.conversation).text  # the student's own default system turn
    assert "<think>" in seq.text  # the teacher's thinking template
    cursor = 0
    for k, messages in enumerate(CONVERSATIONS):
        text, ids, offsets, assistant, spans = independent_student(student, messages)
        n = ids.shape[0]
        assert out["segment_lengths"][k] == n
        assert out["input_ids"][cursor:cursor + n].tolist() == ids.tolist()
        expected = np.zeros(n, bool)
        expected[:-1] = assistant[1:]
        assert out["label_mask"][cursor:cursor + n].tolist() == expected.tolist()
        kd = out["kd_mask"][cursor:cursor + n]
        assert not (kd & ~expected).any()  # KD only where the next token is assistant content
        for s in np.flatnonzero(kd):
            end = int(offsets[s, 1])
            inside = [(a, b) for role, a, b in spans if a <= end < b]
            assert inside, f"KD at a position whose next character is markup: {text[end - 10:end + 10]!r}"
        cursor += n
    stats = out["stats"]
    assert stats["assistant_tokens"] == int(out["label_mask"].sum())
    assert stats["assistant_aligned"] == int(out["kd_mask"].sum()) > 0.5 * stats["assistant_tokens"]


def test_aligned_positions_consumed_the_same_content(tokenizers, builder):
    """Each KD pair: the teacher position and the student position end at the same character of the same message
    content (checked through the teacher's cached spans and an independent student str.find)."""
    from distill.data.xtok.chat_targets import chat_example

    teacher, student = tokenizers
    seq = teacher_window(teacher, CONVERSATIONS)
    out = chat_example(builder, seq)
    window = builder.renderer.window(seq.conversation)
    from distill.data.xtok.chat import content_codes, teacher_spans
    from distill.data.xtok.chat_targets import char_ends, match_codes

    t_ends, t_ok, _ = char_ends(seq.input_ids, seq.offsets, seq.text, builder.teacher_bytes, builder._teacher_norm)
    s_ends, s_ok, _ = char_ends(window.ids, window.offsets, window.text, builder.student_bytes, builder._student_norm)
    t_codes = content_codes(t_ends, teacher_spans(seq.conversation), window.bases)
    s_codes = content_codes(s_ends, window.spans, window.bases)
    t_codes[~t_ok] = -1
    s_codes[~s_ok] = -1
    pairs = match_codes(s_codes, t_codes)
    assert (pairs[out["kd_mask"]] >= 0).all()

    def content_prefix(text, end, spans, conversation):
        for k, m, f, a, b, o in spans:
            if a <= end < b:
                msg = conversation[k]["messages"][m]
                return k, m, f, msg.get(f, msg["content"])[: o + end - a]  # inline reasoning: offsets into content
        return None

    t_spans = teacher_spans(seq.conversation)
    checked = 0
    for s in np.flatnonzero(out["kd_mask"]):
        t = pairs[s]
        got_s = content_prefix(window.text, int(s_ends[s]), window.spans, seq.conversation)
        got_t = content_prefix(seq.text, int(t_ends[t]), t_spans, seq.conversation)
        assert got_s is not None and got_s == got_t
        assert window.text[s_ends[s]] == seq.text[t_ends[t]]  # both predict the same next content character
        checked += 1
    assert checked > 20
