"""Assistant messages with `tool_calls` and rows with a `tools` column, on the real Qwen3 template (which renders both)
and the real SmolLM2 template (which renders neither): what the template renders for a tool call is assistant output
(masked like an answer, as TRL's assistant_only_loss does with generation markers), the tools reach the template on
both the teacher's and a student's side, and templates that cannot be located exactly are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_tools.format import chat_data, packing
from cache_tools.format.conversations import BadRow, RenderError, check_messages, render, row_tools, token_masks
from tests.chat_fixtures import QWEN3, SMOLLM2, chatml_assistant_mask

pytestmark = pytest.mark.skipif(not (QWEN3.is_dir() and SMOLLM2.is_dir()), reason="needs ../shared/tokenizers")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call(city, as_string=False):
    args = {"city": city}
    return {"type": "function", "function": {"name": "get_weather",
                                             "arguments": json.dumps(args) if as_string else args}}


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    # no content, only a call: Qwen3 renders the call right after the header
    {"role": "assistant", "content": None, "tool_calls": [_call("Paris")]},
    {"role": "tool", "content": '{"temp": 21}', "name": "get_weather"},
    # content, then two calls (arguments as a JSON string and as an object; one ends with the character that the
    # end-of-turn markup starts with)
    {"role": "assistant", "content": "Checking two more.", "tool_calls": [_call("Lyon", True), _call("Nice>")]},
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "tool", "content": '{"temp": 27}'},
    {"role": "assistant", "content": "21 C in Paris, 25 in Lyon, 27 in Nice."},
]


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _masks(tok, rendered):
    enc = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
    return offsets, token_masks(offsets, rendered.regions)[0]


def test_tool_calls_are_assistant_output_on_qwen3():
    tok = _tok(QWEN3)
    messages = check_messages(TOOL_CONVERSATION)
    rendered = render(tok, messages, tools=TOOLS)
    # exactly what TRL renders (tools passed to the template, messages as given)
    assert rendered.text == tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False)
    assert '"name": "get_weather", "description"' in rendered.text  # the tools block reached the template
    offsets, assistant = _masks(tok, rendered)
    # independent computation: every token of each assistant turn's body and its <|im_end|>
    assert np.array_equal(assistant, chatml_assistant_mask(rendered.text, offsets))
    assert len(rendered.regions) == 3
    first, second, _ = (rendered.text[lo:hi] for lo, hi in rendered.regions)
    assert first.startswith("<tool_call>") and first.endswith("</tool_call>") and "Paris" in first
    assert second.startswith("Checking two more.") and second.endswith("</tool_call>") and 'Nice>"}}' in second
    for msg, field, start, end, offset in rendered.spans:  # content spans stay exact
        assert rendered.text[start:end] == messages[msg][field][offset : offset + end - start]
    # the tool results are input, not output
    response = rendered.text.index('{"temp": 21}')
    assert not assistant[(offsets[:, 0] >= response) & (offsets[:, 1] <= response + 12)].any()


def test_template_without_tool_rendering_masks_content_only():
    tok = _tok(SMOLLM2)  # ChatML that renders neither tools nor tool_calls
    rendered = render(tok, check_messages(TOOL_CONVERSATION), tools=TOOLS)
    assert "get_weather" not in rendered.text
    assert [rendered.text[lo:hi] for lo, hi in rendered.regions] == ["Checking two more.",
                                                                     "21 C in Paris, 25 in Lyon, 27 in Nice."]
    offsets, assistant = _masks(tok, rendered)
    expected = chatml_assistant_mask(rendered.text, offsets)
    empty_turn = rendered.text.index("<|im_start|>assistant\n<|im_end|>") + len("<|im_start|>assistant\n")
    expected[offsets[:, 0] == empty_turn] = False  # a turn the template renders empty has nothing to learn
    assert np.array_equal(assistant, expected)


def test_template_that_rewrites_around_tool_calls_is_refused():
    tok = _tok(QWEN3)
    rewriting = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}CALLS {{ m.tool_calls[0]"
                 ".function.name }} {% else %}no calls {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}")
    messages = check_messages(TOOL_CONVERSATION[:3] + [{"role": "assistant", "content": "done"}])
    with pytest.raises(RenderError, match="message 1 \\(assistant\\): the chat template renders its tool calls by "
                                          "changing other text"):
        render(tok, messages, template=rewriting)


@pytest.mark.parametrize("message, words", [
    ({"role": "assistant", "content": "a", "tool_calls": "get_weather"}, "tool_calls is str, not a list"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
     r"tool_calls\[0\] has no function name"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "has no content"),
    ({"role": "tool", "content": "r", "tool_call_id": 7}, "tool_call_id is int"),
])
def test_malformed_tool_messages_are_named(message, words):
    with pytest.raises(BadRow, match=words):
        check_messages([{"role": "user", "content": "q"}, message])


def test_tools_column():
    assert row_tools({"tools": json.dumps(TOOLS)}) == TOOLS == row_tools({"tools": TOOLS})
    assert row_tools({}) is None and row_tools({"tools": None}) is None
    for bad, words in (("{not json", "not JSON"), ([1], "not a list of function schemas")):
        with pytest.raises(BadRow, match=words):
            row_tools({"tools": bad})


def test_tools_travel_with_the_cached_conversation_to_a_student(tmp_path):
    from distill.data.xtok.chat import StudentRenderer

    tok = _tok(QWEN3)
    data = tmp_path / "tools.jsonl"
    rows = [{"messages": TOOL_CONVERSATION, "tools": TOOLS},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = chat_data.ChatStats()
    pieces = list(chat_data.conversation_pieces(tok, str(data), split="train", row_format="messages",
                                                template=None, kwargs={}, max_samples=None, streaming=False,
                                                stats=stats))
    assert stats.bad == 0 and pieces[0].tools == TOOLS and pieces[1].tools is None
    (window,) = packing.pack_conversations(pieces, 4096)
    first, second = window.conversation
    assert first["tools"] == TOOLS and "tools" not in second
    # a student re-renders the cached record with the tools: here with the teacher's own template, so its text and
    # mask must equal the teacher's piece exactly
    student = StudentRenderer(tok, tok.chat_template)
    text, _, ids, _, assistant = student.piece(json.loads(json.dumps(first)))
    assert text == pieces[0].text and ids.tolist() == pieces[0].ids
    assert np.array_equal(assistant, pieces[0].assistant)
