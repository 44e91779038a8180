"""Bad text input to `build-cache`: invalid UTF-8 and broken JSON are refused in one line naming the file, the line
and the fix (nothing is written); rows without text are counted in one warning; NUL bytes and a 5 MB line go
through unchanged.

Choice for rows without the text field (or with null): they are SKIPPED with one warning giving the count and the
first line, not refused. Real corpora mix record types (metadata rows, empty documents), and a skipped row changes
no other row's targets; the warning keeps the count visible. A column that no row has is still refused (a typo in
--text-column), and a column holding non-text values (lists, numbers) is refused: there is no faithful text to use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_tools.format import schema
from cache_tools.format.text_data import load_documents, pack_windows
from faults.harness import assert_one_line_error, run_cli

pytestmark = pytest.mark.faults

GOOD = "The quick brown fox jumps over the lazy dog and keeps running through the field until night falls."


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


BAD_FILES = {
    # name: (file name, bytes, what the error line must name besides the file)
    "invalid_utf8_txt": ("d.txt", GOOD.encode() + b"\nbad \xff\xfe bytes\n" + GOOD.encode() + b"\n",
                         ("line 2", "UTF-8", "iconv")),
    "invalid_utf8_jsonl": ("d.jsonl", json.dumps({"text": GOOD}).encode() + b'\n{"text": "bad \xc3\x28"}\n',
                           ("line 2", "UTF-8")),
    "broken_json_line": ("d.jsonl", f'{json.dumps({"text": GOOD})}\n{{"text": "unterminated\n'.encode(),
                         ("line 2", "not a JSON object")),
    "non_text_value": ("d.jsonl", f'{json.dumps({"text": GOOD})}\n{json.dumps({"text": ["a", "b"]})}\n'.encode(),
                       ("row 2", "not text", "--text-column")),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused_in_one_line(case, tmp_path, build_args, capsys):
    name, data, names = BAD_FILES[case]
    dataset = tmp_path / name
    dataset.write_bytes(data)
    out = tmp_path / "cache"
    argv = build_args(out)
    argv[argv.index("--dataset") + 1] = str(dataset)
    outcome = run_cli(argv, capsys)
    assert_one_line_error(outcome, "build-cache", str(dataset), *names)
    assert not out.exists(), "a refused build left a folder behind"


def test_rows_without_text_are_counted(tmp_path, build_args, capsys):
    """3 of 8 rows lack the field or hold null: one warning with the count and the first line; the cache holds the
    other rows only, and verifies."""
    rows = [{"text": f"{GOOD} {i}"} for i in range(5)]
    rows.insert(1, {"title": "no text here"})
    rows.insert(4, {"text": None})
    rows.append({"meta": 1})
    dataset = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "cache"
    argv = build_args(out)
    argv[argv.index("--dataset") + 1] = str(dataset)
    argv[argv.index("--max-samples") + 1] = "100"
    outcome = run_cli(argv, capsys)
    assert outcome.code == 0, "\n".join(outcome.stderr)
    warnings = [ln for ln in outcome.stderr if ln.startswith("warning:")]
    assert len(warnings) == 1, outcome.stderr
    assert "3 of 8 rows" in warnings[0] and f"line 2 of {dataset}" in warnings[0], warnings[0]
    assert run_cli(["verify", str(out)], capsys).code == 0
    from cache_tools.format.reader import TeacherCacheReader

    reader = TeacherCacheReader(out)
    used = {reader[i].doc_index for i in range(len(reader))}
    assert used <= {0, 2, 3, 5, 6}, used  # rows 1, 4 and 7 had no text


def test_nul_bytes_pass_through_text_data(tmp_path):
    rows = [{"text": "before\x00after"}, {"text": "\x00"}]
    docs = list(load_documents(str(_jsonl(tmp_path / "d.jsonl", rows))))
    assert [t for _, t in docs] == ["before\x00after", "\x00"]


def test_nul_bytes_round_trip_through_the_cache(tmp_path, build_args, capsys):
    """Web text contains NULs: the build stores them and the reader returns the exact text (lossless storage is the
    format helper's; this checks the whole path)."""
    text = f"{GOOD} with a NUL\x00 inside and another\x00 here."
    dataset = _jsonl(tmp_path / "d.jsonl", [{"text": text}])
    out = tmp_path / "cache"
    argv = build_args(out)
    argv[argv.index("--dataset") + 1] = str(dataset)
    outcome = run_cli(argv, capsys)
    assert outcome.code == 0, "\n".join(outcome.stderr)
    from cache_tools.format.reader import TeacherCacheReader

    reader = TeacherCacheReader(out)
    stored = "".join(reader[i].text for i in range(len(reader)))
    assert "\x00" in stored and stored.count("\x00") == 2
    assert GOOD in stored


def _five_mb_file(tmp_path: Path) -> tuple[Path, str]:
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "return", "value"], size=900_000)
    text = " ".join(words)[: 5 * 2**20]
    assert len(text) == 5 * 2**20
    return _jsonl(tmp_path / "big.jsonl", [{"text": text}, {"text": "small"}]), text


def test_a_5mb_line_is_read_whole(tmp_path):
    """One 5 MB document (a single JSON line) is read unchanged (pyarrow's block size is not a limit)."""
    dataset, text = _five_mb_file(tmp_path)
    docs = list(load_documents(str(dataset)))
    assert [len(t) for _, t in docs] == [len(text), 5] and docs[0][1] == text


@pytest.mark.faults_full
def test_a_5mb_line_is_packed_without_truncation(tmp_path, tokenizer):
    """...and tokenised whole (~40 s on a busy 2-core machine: the Rust tokenizer, linear in the length)."""
    dataset, text = _five_mb_file(tmp_path)
    docs = list(load_documents(str(dataset)))
    windows = list(pack_windows(tokenizer, iter(docs[:1]), 4096))
    assert len(windows) > 100 and all(len(w.input_ids) == 4096 for w in windows[:-1])
    assert "".join(w.text for w in windows) == text  # every character of the line is in exactly one window


def test_text_column_absent_everywhere_is_refused(tmp_path, build_args, capsys):
    dataset = _jsonl(tmp_path / "d.jsonl", [{"body": GOOD}, {"body": GOOD}])
    argv = build_args(tmp_path / "cache")
    argv[argv.index("--dataset") + 1] = str(dataset)
    outcome = run_cli(argv, capsys)
    assert_one_line_error(outcome, "build-cache", "--text-column 'text'", "body")
    assert schema.MANIFEST_NAME not in str(list(tmp_path.iterdir()))


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streaming"])
def test_rows_without_text_on_the_console_and_in_inspect(tmp_path, build_args, capsys, streaming):
    """The real command (forked: its own stderr, progress bar on): the skip is one warning line with the count, and
    `inspect` shows the count afterwards (text and --json)."""
    from faults.harness import run_forked

    rows = [{"text": f"{GOOD} {i}"} for i in range(6)]
    rows.insert(2, {"title": "no text here"})
    rows.insert(5, {"text": None})
    dataset = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "cache"
    argv = [a for a in build_args(out) if a != "--no-progress"] + (["--streaming"] if streaming else [])
    argv[argv.index("--dataset") + 1] = str(dataset)
    argv[argv.index("--max-samples") + 1] = "100"
    outcome = run_forked(argv)
    text = "\n".join(outcome.stderr)
    assert outcome.code == 0 and "Traceback" not in text, text
    warnings = [ln for ln in outcome.stderr if "warning:" in ln]
    assert len(warnings) == 1 and "2 of 8 rows" in warnings[0] and f"line 3 of {dataset}" in warnings[0], text
    from cache_tools.cli import main

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"2 (skipped; first at line 3 of {dataset})" in shown, shown
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_read"] == 8 and summary["rows_without_text"] == 2, summary
