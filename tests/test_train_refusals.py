"""Runs refused before any weight is loaded, each in one line naming the flag and the fix: --max_steps 0, an
--output_dir holding another run, a student with fewer positions than the cache's windows."""

from __future__ import annotations

import pytest
from cache_fixtures import write_synthetic_cache

from distill.train import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("refusals") / "cache", tokenizer, corpus, num_sequences=8,
                                 max_length=24, shard_size=4)


def _argv(student, cache, out, *extra) -> list[str]:
    return ["--student", str(student), "--cache", str(cache), "--output_dir", str(out), "--use_cpu",
            "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy",
            "no", *map(str, extra)]


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_zero_is_refused(steps, student_dir, cache, tmp_path, capsys):
    assert main(_argv(student_dir, cache, tmp_path / "out", "--max_steps", steps)) == 2
    line = _one_line(capsys)
    assert f"--max_steps {steps}: give a positive number" in line and "-1" in line
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_not_overwritten_silently(student_dir, cache, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(student_dir, cache, out, "--max_steps", 1)) == 0
    first = (out / "student" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_argv(student_dir, cache, out, "--max_steps", 1)) == 2
    line = _one_line(capsys)
    assert f"--output_dir {out}: holds a previous run (student, distill_config.yaml)" in line
    assert "--overwrite_output_dir true" in line and "--resume_from_checkpoint true" in line
    assert (out / "student" / "model.safetensors").stat().st_mtime_ns == first
    assert main(_argv(student_dir, cache, out, "--max_steps", 1, "--overwrite_output_dir", "true")) == 0


def test_a_student_with_fewer_positions_than_the_windows_is_refused(tmp_path, tokenizer, cache, text_file, capsys):
    from examples.tiny_models import save_random_model, tiny_llama_config

    short = save_random_model(tiny_llama_config(len(tokenizer), max_positions=16), tmp_path / "short", tokenizer)
    capsys.readouterr()
    assert main(_argv(short, cache, tmp_path / "out", "--max_steps", 1)) == 2
    line = _one_line(capsys)
    assert f"--student: 16 positions (max_position_embeddings) but the cache {cache} holds windows of up to 24" in line
    assert "--max-length 16" in line
    assert main(["--student", str(short), "--dataset", str(text_file), "--output_dir", str(tmp_path / "lm"),
                 "--use_cpu", "--max_length", "64", "--report_to", "none", "--kd_weight", "0"]) == 2
    assert "--max_length 64: the student (--student) has 16 positions" in capsys.readouterr().err.splitlines()[-1]
