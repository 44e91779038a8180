"""Conversation rendering and assistant masks on the real Qwen3 (thinking template) and SmolLM2 (ChatML) tokenizers:
the masks equal an independent computation from the rendered text (regular expressions over ChatML), content spans
are exact, multi-turn with and without reasoning, prompt/completion and messages, and every malformed-row case."""

from __future__ import annotations

import numpy as np
import pytest

from cache_tools.format import conversations
from cache_tools.format.conversations import BadRow, RenderError, check_messages, render, row_messages, token_masks
from tests.chat_fixtures import QWEN3, SMOLLM2, chatml_assistant_mask, make_conversations

pytestmark = pytest.mark.skipif(not (QWEN3.is_dir() and SMOLLM2.is_dir()), reason="needs ../shared/tokenizers")

MULTI_TURN_REASONING = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does len() return for a list?"},
    {"role": "assistant", "content": "<think>\nThe user asks about len.\n</think>\n\nThe number of items."},
    {"role": "user", "content": "And for a dict?"},
    {"role": "assistant", "content": "The number of keys, café ☕ included.", "reasoning_content": "Keys count."},
]
NO_REASONING = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "assistant"},  # content equal to template text: must not be matched in a header
    {"role": "assistant", "content": "assistant"},
]


@pytest.fixture(scope="module", params=["qwen3", "smollm2"])
def tok(request):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3 if request.param == "qwen3" else SMOLLM2)


def _masks(tok, messages, **kwargs):
    rendered = render(tok, check_messages(messages), kwargs=kwargs)
    enc = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
    assistant, targets = token_masks(offsets, rendered.regions)
    return rendered, offsets, assistant, targets


def _check_spans(rendered):
    for msg, field, start, end, offset in rendered.spans:
        source = conversations.field_text(rendered.messages[msg], field)
        assert rendered.text[start:end] == source[offset : offset + end - start]


@pytest.mark.parametrize("messages", [MULTI_TURN_REASONING, NO_REASONING], ids=["reasoning", "plain"])
def test_mask_equals_independent_chatml_computation(tok, messages):
    rendered, offsets, assistant, targets = _masks(tok, messages)
    assert np.array_equal(assistant, chatml_assistant_mask(rendered.text, offsets))
    assert np.array_equal(targets[:-1], assistant[1:]) and not targets[-1]
    _check_spans(rendered)
    # every assistant answer is covered by a content span of its own message
    for index, msg in enumerate(messages):
        if msg["role"] == "assistant":
            answer = msg["content"].split("</think>")[-1].strip()
            assert any(m == index and answer in rendered.text[s:e] for m, f, s, e, o in rendered.spans)


def test_qwen3_reasoning_moves_and_drops():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN3)
    rendered, offsets, assistant, _ = _masks(tok, MULTI_TURN_REASONING)
    assert "The user asks about len." not in rendered.text  # earlier turn: reasoning dropped by the template
    assert "<think>\nKeys count.\n</think>" in rendered.text  # last turn: reasoning_content rendered
    fields = {(m, f) for m, f, *_ in rendered.spans}
    assert (4, "reasoning_content") in fields and (2, "reasoning_content") not in fields
    think = rendered.text.index("<think>\nKeys")
    # the think block of the last turn is generated text: masked like the answer
    assert assistant[(offsets[:, 0] >= think) & (offsets[:, 1] <= len(rendered.text))].sum() > 0
    _, offsets_off, assistant_off, _ = _masks(tok, MULTI_TURN_REASONING[:4] + [
        {"role": "assistant", "content": "Keys."}], enable_thinking=False)
    assert assistant_off.sum() < assistant.sum()


def test_many_generated_conversations_match(tok, corpus):
    for row in make_conversations(corpus, 25, seed=11):
        rendered, offsets, assistant, _ = _masks(tok, row["messages"])
        assert np.array_equal(assistant, chatml_assistant_mask(rendered.text, offsets))
        _check_spans(rendered)


def test_prompt_completion_rows(tok):
    msgs, plain = row_messages({"prompt": "2 + 2 =", "completion": " 4"}, "prompt_completion")
    assert plain
    rendered = render(tok, msgs, plain=True, eos_text=tok.eos_token)
    assert rendered.text == "2 + 2 = 4" + tok.eos_token
    enc = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    assistant, _ = token_masks(np.asarray(enc["offset_mapping"]), rendered.regions)
    completion = [tok.decode([i]) for i, a in zip(enc["input_ids"], assistant, strict=True) if a]
    assert "".join(completion) == " 4" + tok.eos_token  # completion + EOS, as TRL appends it
    msgs, plain = row_messages({"prompt": [{"role": "user", "content": "Hi"}],
                                "completion": [{"role": "assistant", "content": "Hello!"}]}, "prompt_completion")
    rendered, offsets, assistant, _ = _masks(tok, msgs)
    assert not plain and np.array_equal(assistant, chatml_assistant_mask(rendered.text, offsets))


@pytest.mark.parametrize("row, words", [
    ({"messages": None}, "missing"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"content": "x"}]}, "no role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user"}]}, "has no content"),
    ({"messages": [{"role": "user", "content": 3}]}, "content is int"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": ["hi"]}, "not a {role, content} object"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                      "reasoning_content": 1}]}, "reasoning_content is int"),
])
def test_malformed_rows_are_named(row, words):
    with pytest.raises(BadRow, match=words.replace("{", r"\{").replace("}", r"\}")):
        row_messages(row, "messages")


def test_prompt_completion_malformed():
    with pytest.raises(BadRow, match="both must be strings or both lists"):
        row_messages({"prompt": "q", "completion": None}, "prompt_completion")
    with pytest.raises(BadRow, match="no assistant message"):
        row_messages({"prompt": [{"role": "user", "content": "q"}],
                      "completion": [{"role": "user", "content": "a"}]}, "prompt_completion")


def test_template_that_rewrites_content_is_refused_never_shifted(tok):
    upper = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n{% endfor %}")
    with pytest.raises(RenderError, match="message 1 \\(assistant\\): its content is not in the text"):
        render(tok, check_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}]),
               template=upper)


def test_template_that_raises_is_a_render_error(tok):
    raising = "{{ raise_exception('only user turns') }}"
    with pytest.raises(RenderError, match="chat template raised"):
        render(tok, check_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
               template=raising)


def test_detect_row_format():
    assert conversations.detect_row_format(["messages", "id"]) == "messages"
    assert conversations.detect_row_format(["prompt", "completion"]) == "prompt_completion"
    assert conversations.detect_row_format(["text"]) == "text"
