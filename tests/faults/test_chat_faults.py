"""Conversational input faults: malformed rows are skipped and named one line each (file and line), a dataset where
none survive and a missing or broken chat template are one-line errors (exit 2, nothing written), and a cache whose
mask datasets are damaged (checksums re-recorded, so only content checks can tell) is caught by verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_tools.format import schema
from faults.harness import assert_one_line_error, edit_shard_consistently, run_cli
from tests.chat_fixtures import write_jsonl

pytestmark = pytest.mark.faults

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GOOD = {"messages": [{"role": "user", "content": "What is two and two?"},
                     {"role": "assistant", "content": "Four, as everyone knows."}]}
BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}, "has no role"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "has no content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]}, "content is list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
]
FLAGS = ("--max-length", "64", "--top-k", "4", "--batch-size", "2", "--no-progress")


def _argv(teacher_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["build-cache", "--teacher", str(teacher_dir), "--dataset", str(data), "--output", str(out), *FLAGS,
            *extra]


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat_template") / "chatml.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    return path


def test_bad_rows_are_named_and_counted(tmp_path, teacher_dir, template_file, capsys):
    rows = [GOOD] + [row for row, _ in BAD_ROWS] + [GOOD]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    outcome = run_cli(_argv(teacher_dir, data, tmp_path / "c", "--chat-template", str(template_file)), capsys)
    assert outcome.code == 0
    warnings = [line for line in outcome.stderr if line.startswith("warning:")]
    assert len(warnings) == len(BAD_ROWS)
    for line, (number, (_, words)) in zip(warnings, enumerate(BAD_ROWS, start=2), strict=True):
        assert f"line {number} of {data}" in line and words in line
    assert any(f"{len(rows)} conversations: {len(BAD_ROWS)} malformed" in line for line in outcome.stderr)
    manifest = json.loads((tmp_path / "c" / schema.MANIFEST_NAME).read_text())
    assert manifest["rows"]["without_text"] == len(BAD_ROWS)


def test_no_row_survives_is_one_line(tmp_path, teacher_dir, template_file, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    out = tmp_path / "c"
    outcome = run_cli(_argv(teacher_dir, data, out, "--chat-template", str(template_file)), capsys)
    line = assert_one_line_error(outcome, "build-cache", str(data), "none of its 5 conversations is usable")
    assert "line 1 of" in line and not out.exists()


def test_missing_template_names_the_flag(tmp_path, teacher_dir, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    outcome = run_cli(_argv(teacher_dir, data, tmp_path / "c"), capsys)
    assert_one_line_error(outcome, "build-cache", "has no chat template", "--chat-template")
    outcome = run_cli(_argv(teacher_dir, data, tmp_path / "c", "--chat-template", str(tmp_path / "nope.jinja")),
                      capsys)
    assert_one_line_error(outcome, "build-cache", "--chat-template", "no such file")
    outcome = run_cli(_argv(teacher_dir, data, tmp_path / "c", "--chat-template-kwargs", "{oops"), capsys)
    assert_one_line_error(outcome, "build-cache", "--chat-template-kwargs", "not JSON")
    assert not (tmp_path / "c").exists()


def test_template_that_raises(tmp_path, teacher_dir, capsys):
    template = tmp_path / "picky.jinja"
    template.write_text("{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}"
                        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}",
                        encoding="utf-8")
    boom = {"messages": [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "x"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD, boom])
    outcome = run_cli(_argv(teacher_dir, data, tmp_path / "c", "--chat-template", str(template)), capsys)
    assert outcome.code == 0
    assert any("line 2 of" in line and "chat template raised" in line and "no boom" in line
               for line in outcome.stderr)
    data = write_jsonl(tmp_path / "all_boom.jsonl", [boom, boom])
    outcome = run_cli(_argv(teacher_dir, data, tmp_path / "d", "--chat-template", str(template)), capsys)
    assert_one_line_error(outcome, "build-cache", "none of its 2 conversations is usable", "chat template raised")


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, teacher_dir, template_file) -> Path:
    from cache_tools.cli import main

    root = tmp_path_factory.mktemp("chat_cache")
    data = write_jsonl(root / "chat.jsonl", [GOOD] * 6)
    assert main(_argv(teacher_dir, data, root / "cache", "--chat-template", str(template_file))) == 0
    return root / "cache"


def _flip_assistant(values: np.ndarray) -> None:
    row = values[0]
    first = int(np.argmax(row > 0))
    row[first] = 0  # the first assistant token no longer marked: the target before it now disagrees


@pytest.mark.parametrize("dataset, edit, words", [
    (schema.ASSISTANT_MASK, _flip_assistant, "assistant_mask and target_mask disagree"),
    (schema.TARGET_MASK, lambda v: v.__setitem__((0, 0), 2), "target_mask holds values other than 0/1"),
])
def test_verify_catches_damaged_masks(tmp_path, chat_cache, capsys, dataset, edit, words):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(chat_cache, cache)
    assert run_cli(["verify", str(cache)], capsys).code == 0
    edit_shard_consistently(cache, 0, dataset, edit)
    outcome = run_cli(["verify", str(cache)], capsys)
    assert outcome.code == 2
    assert any(schema.shard_name(0) in line and words in line for line in outcome.stderr), outcome.stderr
