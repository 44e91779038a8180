"""Checkpoints killed mid-save: `--resume_from_checkpoint` (true, or the damaged folder's path) skips a checkpoint that
was not fully written, with one warning line, and resumes exactly from the last complete one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.format.errors import ConfigError
from distill.train import main
from distill.training.checkpoints import MARKER, checkpoint_fault, resolve_resume


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("ckpt") / "c", tokenizer, corpus, num_sequences=8)


def _argv(student_dir, cache_dir, out, *extra) -> list[str]:
    return ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(out), "--use_cpu", "true",
            "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps",
            "1", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
            *extra]


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, student_dir, cache_dir):
    """A 4-step run saving checkpoint-2 and checkpoint-4; kept pristine (tests copy it)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(_argv(student_dir, cache_dir, out)) == 0
    return out


def _damage(folder: Path, how: str) -> str:
    """Damage one checkpoint as a kill mid-save would; returns the file name the fault report must name."""
    if how == "optimizer_truncated":
        path = folder / "optimizer.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "state_missing":
        path = folder / "trainer_state.json"
        path.unlink()
    elif how == "weights_truncated_no_marker":  # killed before the marker: judged by structure
        (folder / MARKER).unlink()
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "optimizer_missing_no_marker":
        (folder / MARKER).unlink()
        path = folder / "optimizer.pt"
        path.unlink()
    else:
        raise AssertionError(how)
    return path.name


@pytest.mark.parametrize("how", ["optimizer_truncated", "state_missing", "weights_truncated_no_marker",
                                 "optimizer_missing_no_marker"])
def test_incomplete_checkpoints_are_detected(tmp_path, straight, how):
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(straight / "checkpoint-4", folder)
    assert checkpoint_fault(folder) is None  # complete, with its marker
    (folder / MARKER).rename(tmp_path / "marker")
    assert checkpoint_fault(folder) is None  # complete by structure too
    (tmp_path / "marker").rename(folder / MARKER)
    name = _damage(folder, how)
    fault = checkpoint_fault(folder)
    assert fault is not None and name in fault


def test_resume_skips_a_checkpoint_killed_mid_save(tmp_path, student_dir, cache_dir, straight, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "student")  # the run's final export: it must be written again
    _damage(out / "checkpoint-4", "optimizer_truncated")
    assert main(_argv(student_dir, cache_dir, out, "--resume_from_checkpoint", "true")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipping")]
    assert len(warning) == 1 and "checkpoint-4: optimizer.pt has" in warning[0]
    assert warning[0].endswith(str(out / "checkpoint-2"))
    resumed, reference = _losses(out), _losses(straight)
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], rel=1e-6)
    assert checkpoint_fault(out / "checkpoint-4") is None and (out / "student" / "model.safetensors").is_file()


def test_resolve_resume_paths_and_errors(tmp_path, straight, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("student"))
    assert resolve_resume(None, out) is None and resolve_resume("false", out) is None
    assert resolve_resume("true", out) == str(out / "checkpoint-4")
    assert resolve_resume(str(out / "checkpoint-2"), out) == str(out / "checkpoint-2")
    _damage(out / "checkpoint-4", "state_missing")
    assert resolve_resume(str(out / "checkpoint-4"), out) == str(out / "checkpoint-2")  # the damaged one's path
    assert "checkpoint-4: trainer_state.json is missing" in capsys.readouterr().err
    _damage(out / "checkpoint-2", "optimizer_truncated")
    with pytest.raises(ConfigError, match="no completely written checkpoint"):
        resolve_resume("true", out)
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        resolve_resume(str(out / "checkpoint-9"), out)
    with pytest.raises(ConfigError, match="no checkpoint-N folder"):
        resolve_resume("true", tmp_path / "empty")


def test_no_complete_checkpoint_is_a_one_line_error(tmp_path, student_dir, cache_dir, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)  # a save killed before any file was written
    assert main(_argv(student_dir, cache_dir, out, "--resume_from_checkpoint", "true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-2" in err[0]
    assert err[0].startswith("python -m distill.train: error: --resume_from_checkpoint true")


def test_the_private_save_override_is_still_needed_and_reached(tmp_path, student_dir, cache_dir):
    """`DistillTrainer._save` is a private override; this pins the transformers behaviour it relies on: every save
    path calls `_save(output_dir, state_dict=...)`, and for a model that is no `PreTrainedModel` Trainer's own `_save`
    writes the raw state dict with safetensors, which refuses the tied embeddings of this student."""
    import inspect

    from safetensors.torch import load_file
    from transformers import Trainer

    from distill.train import build_trainer
    from distill.training.config import parse_config, validate

    assert list(inspect.signature(Trainer._save).parameters) == ["self", "output_dir", "state_dict"]
    assert "self._save(output_dir" in inspect.getsource(Trainer.save_model)
    cfg = parse_config(_argv(student_dir, cache_dir, tmp_path / "o"))
    validate(cfg)
    trainer = build_trainer(cfg).trainer
    with pytest.raises(RuntimeError, match="share memory"):
        Trainer._save(trainer, str(tmp_path / "plain"))  # without the override: refused
    trainer.save_model(str(tmp_path / "ours"))
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert {"student.model.embed_tokens.weight", "student.lm_head.weight"} <= set(saved)
