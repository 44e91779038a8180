"""The chat demo's pieces that need no training: its conversations are valid TRL rows whose assistant content both
templates render verbatim (spans found on both sides, different text), and the report states the paired gain and the
unstored targets. The whole pipeline (`python -m examples.chat_demo --quick`, ~2 min of subprocesses) is run by hand
and in docs/RESULTS.md, not in the default suite."""

from __future__ import annotations

import json

from cache_tools.format import conversations as conv
from examples.chat_demo import data
from examples.chat_demo.__main__ import report


def test_conversations_render_with_both_templates(tmp_path):
    from transformers import AutoTokenizer

    rows = data.conversations(40)
    assert len(rows) == 40 and any(len(r["messages"]) >= 4 for r in rows)
    texts = [m["content"] for r in rows for m in r["messages"]]
    teacher = AutoTokenizer.from_pretrained(data.train_tokenizer(texts, 300, data.TEACHER_SPECIALS,
                                                                 data.TEACHER_TEMPLATE, tmp_path / "t"))
    student = AutoTokenizer.from_pretrained(data.train_tokenizer(texts, 280, data.STUDENT_SPECIALS,
                                                                 data.STUDENT_TEMPLATE, tmp_path / "s",
                                                                 split_digits=True))
    for row in rows[:10]:
        t, s = conv.render(teacher, row["messages"]), conv.render(student, row["messages"])
        assert t.text != s.text
        assistant = sum(m["role"] == "assistant" for m in row["messages"])
        assert len(t.regions) == len(s.regions) == assistant
        assert teacher("<|im_start|>", add_special_tokens=False)["input_ids"] == [teacher.convert_tokens_to_ids(
            "<|im_start|>")]
    train, held = data.split_rows(rows)
    assert len(held) == 4 and len(train) == 36


def test_report_states_paired_gain_and_unstored_targets(tmp_path):
    result = {"settings": {"teacher_vocab": 1, "student_vocab": 2, "max_length": 3, "top_k": 4, "student_steps": 5},
              "cache": {"windows": 2, "positions": 100, "stored": 60, "not_stored": 40},
              "coverage": {"assistant_aligned_fraction": 0.9, "aligned_fraction": 0.6},
              "heldout_assistant_ce": {"kd": [3.0, 3.1], "lm_only": [3.2, 3.2]}, "seconds": {"students": 1.0}}
    text = report(result, tmp_path).read_text()
    assert "+6.25%" in text and "+3.13%" in text and "+4.69%" in text and "goal >= 3%: met" in text
    assert "40 of 100 cached positions" in text
    assert json.loads((tmp_path / "report.json").read_text())["gain_mean"] > 3
