"""Bad input to `cache_tools build-cache`: a one-line error naming the flag/file and the fix, exit != 0, and nothing
written to --output."""

from __future__ import annotations

import re

import pytest

from cache_tools.cli import main
from cache_tools.format import schema


@pytest.fixture(scope="module")
def good_args(teacher_dir, text_file):
    return ["--teacher", str(teacher_dir), "--dataset", str(text_file), "--max-length", "32", "--top-k", "8",
            "--max-samples", "3", "--pool-layers", "-1", "--no-progress"]


def _run(capsys, args: list[str]) -> str:
    code = main(["build-cache", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err, "no error message"
    assert err[-1].startswith("cache_tools build-cache: error: "), err[-1]
    return err[-1]


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--teacher", "/nonexistent/teacher", r"--teacher /nonexistent/teacher: no such model directory"),
        ("--dataset", "/nonexistent/data.txt", r"--dataset /nonexistent/data.txt: no such file"),
        ("--top-k", "100000", r"--top-k 100000: .*vocabulary size \(512\).*lower --top-k"),
        ("--max-length", "4096", r"--max-length 4096: the teacher has 512 positions"),
        ("--pool-layers", "7", r"--pool-layers 7: .*0\.\.2"),
    ],
)
def test_bad_flag(capsys, tmp_path, good_args, flag, value, expected):
    out = tmp_path / "out"
    message = _run(capsys, [*_replace(good_args, flag, value), "--output", str(out)])
    assert re.search(expected, message), message
    assert not out.exists()


def test_empty_dataset(capsys, tmp_path, good_args):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    out = tmp_path / "out"
    message = _run(capsys, [*_replace(good_args, "--dataset", str(empty)), "--output", str(out)])
    assert f"--dataset {empty}: no text" in message and "--text-column" in message
    assert not out.exists()


def test_missing_text_column(capsys, tmp_path, good_args):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"content": "hello world"}\n{"content": "more text"}\n', encoding="utf-8")
    out = tmp_path / "out"
    message = _run(capsys, [*_replace(good_args, "--dataset", str(data)), "--output", str(out)])
    assert "--text-column 'text': not in dataset" in message and "content" in message
    assert not out.exists()


def test_output_with_other_settings(capsys, tmp_path, good_args):
    out = tmp_path / "out"
    assert main(["build-cache", *good_args, "--output", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    message = _run(capsys, [*_replace(good_args, "--top-k", "4"), "--output", str(out), "--resume"])
    assert f"--output {out}: holds a cache built with other settings (targets.top_k)" in message
    assert "--overwrite" in message
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_output_folder_with_foreign_files(capsys, tmp_path, good_args):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    message = _run(capsys, [*good_args, "--output", str(out)])
    assert "not a cache (notes.txt" in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_tokenizer_larger_than_head(capsys, tmp_path, good_args, corpus):
    from examples.tiny_models import train_bpe_tokenizer

    big = tmp_path / "bigtok"
    train_bpe_tokenizer(corpus[:100], 700).save_pretrained(big)
    out = tmp_path / "out"
    message = _run(capsys, [*good_args, "--tokenizer", str(big), "--output", str(out)])
    assert "--tokenizer: 700 tokens but the teacher head has only 576 rows" in message
    assert not out.exists()


def test_incomplete_cache_refused_by_reader(tmp_path):
    from cache_tools.format.reader import TeacherCacheReader

    schema.CacheManifest(tokenizer=schema.TokenizerInfo(vocab_size=10, content_hash="x")).save(tmp_path)
    with pytest.raises(schema.CacheError, match=r"manifest.json: cache is incomplete; .*--resume"):
        TeacherCacheReader(tmp_path)


def test_tokenizer_of_another_model_is_refused(capsys, tmp_path, good_args, corpus, tokenizer_dir):
    """A --tokenizer that fits the head but is not the teacher's: its ids would mean other tokens to the teacher."""
    from examples.tiny_models import train_bpe_tokenizer

    other = tmp_path / "othertok"
    train_bpe_tokenizer(corpus[:200], 384, split_digits=True).save_pretrained(other)
    out = tmp_path / "out"
    message = _run(capsys, [*good_args, "--tokenizer", str(other), "--output", str(out)])
    assert f"--tokenizer {other}: does not match the teacher" in message and "--allow-tokenizer-mismatch" in message
    assert not out.exists()
    # The teacher's own tokenizer from another folder is the same tokenizer: accepted.
    assert main(["build-cache", *good_args, "--tokenizer", str(tokenizer_dir), "--output", str(out)]) == 0
    # The explicit flag builds with the mismatch the user asked for.
    assert main(["build-cache", *good_args, "--tokenizer", str(other), "--allow-tokenizer-mismatch", "--output",
                 str(tmp_path / "meant")]) == 0


def test_problem_names_what_differs(tokenizer, corpus):
    from types import SimpleNamespace

    from cache_tools.tokenizer_check import tokenizer_problem

    assert tokenizer_problem(SimpleNamespace(vocab_size=len(tokenizer)), tokenizer, tokenizer) is None
    small_head = tokenizer_problem(SimpleNamespace(vocab_size=3), tokenizer, None)
    assert small_head and "outside the teacher head's 3 rows" in small_head
    other_eos = SimpleNamespace(vocab_size=len(tokenizer), eos_token_id=(tokenizer.eos_token_id or 0) + 1)
    assert "EOS token" in tokenizer_problem(other_eos, tokenizer, None)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--teacher", "no_such_teacher_folder", "--teacher no_such_teacher_folder: no local folder by that name"),
        ("--dataset", "no_such_data.txt", "--dataset no_such_data.txt: no such file or folder"),
    ],
)
def test_a_missing_local_path_is_named_as_such(capsys, tmp_path, good_args, flag, value, expected):
    message = _run(capsys, [*_replace(good_args, flag, value), "--output", str(tmp_path / "out")])
    assert expected in message and "internet" not in message.split(";")[-1] and "None" not in message


def test_an_empty_file_says_empty(capsys, tmp_path, good_args):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    message = _run(capsys, [*_replace(good_args, "--dataset", str(empty)), "--output", str(tmp_path / "out")])
    assert f"--dataset {empty}: empty (the file has 0 bytes)" in message


def test_a_cache_with_a_cross_tokenizer_store_beside_it_resumes(capsys, tmp_path, good_args):
    out = tmp_path / "out"
    assert main(["build-cache", *good_args, "--output", str(out)]) == 0
    (out / "xtok" / "somekey").mkdir(parents=True)  # what `python -m distill.prepare_xtok` writes beside a cache
    assert main(["build-cache", *good_args, "--output", str(out), "--resume"]) == 0, capsys.readouterr().err


def test_student_tokenizer_flag_is_named(capsys, tmp_path):
    from distill.coverage import main as coverage_main

    assert coverage_main([str(tmp_path), "--student-tokenizer", str(tmp_path / "no_tok")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--student-tokenizer {tmp_path / 'no_tok'}: cannot load it" in err[0]


def test_coverage_lines_say_where_the_mass_goes():
    from distill.data.xtok.coverage import format_coverage

    report = {"teacher_tokenizer": "t", "student_tokenizer": "s", "rule": "first_token", "sequences": 2,
              "aligned_positions": 9, "student_tokens": 10, "aligned_fraction": 0.9, "mapped_mass_fraction": 0.999,
              "exact_mass_fraction": 0.7, "exact_teacher_tokens": 5, "teacher_vocab": 10, "exact_student_tokens": 5,
              "student_vocab": 8, "mapped_teacher_tokens": 9, "skipped_windows": 0}
    line = next(ln for ln in format_coverage(report).splitlines() if "mapped top-k mass" in ln)
    assert "exact twins 70.0%, by the rule 29.9%" in line and "0.1% goes to the tail bucket" in line
