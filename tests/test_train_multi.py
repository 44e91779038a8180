"""Training from several teachers' caches: weights 1,0 = the single-teacher run bit for bit, a mismatched cache is
refused before training, resume is exact, per-teacher scalars reach TensorBoard and evaluation."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from cache_fixtures import write_synthetic_cache

from cache_tools.format import schema
from cache_tools.format.errors import ConfigError
from distill.train import build_trainer, main
from distill.training.config import parse_config, validate

SAMPLED = schema.TargetsInfo(kind="sampled", encoding="compact", num_samples=16)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tokenizer, corpus):
    """Two genuinely different teachers (other bigram tables, other target kinds) over the same 16 windows."""
    root = tmp_path_factory.mktemp("multi")
    a = write_synthetic_cache(root / "a", tokenizer, corpus, num_sequences=16, shard_size=8, seed=0)
    b = write_synthetic_cache(root / "b", tokenizer, corpus, num_sequences=16, shard_size=8, seed=1, targets=SAMPLED)
    return a, b


def _argv(student_dir, caches, out, *extra) -> list[str]:
    flags = [x for c in caches for x in ("--cache", str(c))]
    return ["--student", str(student_dir), *flags, "--output_dir", str(out), "--use_cpu", "true",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
            "--disable_tqdm", "true", "--save_strategy", "no", "--max_steps", "4", "--logging_steps", "1",
            *map(str, extra)]


def _train(argv):
    cfg = parse_config(argv)
    validate(cfg)
    built = build_trainer(cfg)
    built.trainer.train()
    return built


def test_weights_one_and_zero_train_exactly_like_the_first_cache_alone(tmp_path, student_dir, caches):
    single = _train(_argv(student_dir, caches[:1], tmp_path / "one"))
    pair = _train(_argv(student_dir, caches, tmp_path / "two", "--teacher_weights", "1,0"))
    for (name, p), (_, q) in zip(single.model.named_parameters(), pair.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    history = lambda b: [(h["step"], h["loss"], h["loss/kd"]) for h in b.trainer.state.log_history if "loss" in h]  # noqa: E731
    assert history(single) == history(pair)
    logged = [h for h in pair.trainer.state.log_history if "loss" in h]
    assert all(h["teacher1/kd"] > 0 and "teacher0/top1_agreement" in h for h in logged)  # the 0-weight one measured
    assert [h["teacher0/kd"] for h in logged] == [h["loss/kd"] for h in logged]


def test_equal_weights_by_default_and_per_teacher_evaluation(tmp_path, student_dir, caches):
    built = _train(_argv(student_dir, caches, tmp_path / "out", "--eval_fraction", "0.5"))
    assert built.model.teacher_weights == [0.5, 0.5]
    metrics = built.trainer.evaluate()
    for i in (0, 1):
        for key in ("kd", "top1_agreement", "teacher_mass_covered"):
            assert f"eval_teacher{i}/{key}" in metrics, sorted(metrics)
    mixture = 0.5 * metrics["eval_teacher0/kd"] + 0.5 * metrics["eval_teacher1/kd"]
    assert metrics["eval_kd"] == pytest.approx(mixture, rel=1e-6)
    assert metrics["eval_teacher0/kd"] != pytest.approx(metrics["eval_teacher1/kd"])


def test_a_cache_over_other_windows_is_refused_before_training(tmp_path, student_dir, caches, tokenizer, corpus,
                                                               capsys):
    other = write_synthetic_cache(tmp_path / "other", tokenizer, [t[::-1] for t in corpus], num_sequences=16,
                                  shard_size=8)
    assert main(_argv(student_dir, [caches[0], other], tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(caches[0]) in err[0] and str(other) in err[0] and "shard-00000.h5" in err[0], err
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize("extra, message", [
    (["--teacher_weights", "0.5,0.3,0.2"], "lists 3 weight(s) for 2 --cache"),
    (["--teacher_weights", "1,-1"], "must be finite, >= 0"),
    (["--teacher_weights", "0,0"], "sum to more than 0"),
])
def test_bad_teacher_weights_are_config_errors(tmp_path, student_dir, caches, extra, message):
    cfg = parse_config(_argv(student_dir, caches, tmp_path / "out", *extra))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_yaml_lists_and_the_command_line_wins(tmp_path, student_dir, caches):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"cache: [{caches[0]}, {caches[1]}]\nteacher_weights: [3, 1]\n")
    cfg = parse_config([str(yaml_file), "--student", str(student_dir), "--output_dir", str(tmp_path / "o")])
    validate(cfg)
    assert cfg.data.cache == [str(caches[0]), str(caches[1])] and cfg.data.teacher_weights == [3, 1]
    cfg = parse_config([str(yaml_file), "--student", str(student_dir), "--output_dir", str(tmp_path / "o"),
                        "--cache", str(caches[1]), "--teacher_weights", "1"])
    assert cfg.data.cache == str(caches[1])  # one --cache on the command line replaces the YAML list


def test_resume_with_several_caches_is_exact(tmp_path, student_dir, caches):
    save = ["--save_strategy", "steps", "--save_steps", "2", "--teacher_weights", "0.7,0.3"]
    straight = tmp_path / "straight"
    assert main(_argv(student_dir, caches, straight, *save)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "student"))
    assert main(_argv(student_dir, caches, resumed, *save, "--resume_from_checkpoint", "true")) == 0

    def losses(out):
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        return {h["step"]: (h["loss"], h["teacher1/kd"]) for h in state["log_history"] if "loss" in h}

    assert losses(resumed) == losses(straight)
    from safetensors.torch import load_file

    a, b = load_file(straight / "checkpoint-4" / "model.safetensors"), load_file(resumed / "checkpoint-4" /
                                                                                "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_reports_each_teacher_and_the_mixture(student_dir, caches, tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    from distill.evaluate import evaluate_student
    from distill.evaluate import main as evaluate_main

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    both = evaluate_student(student, tokenizer, [str(c) for c in caches], batch_size=4, teacher_weights="3,1")
    alone = [evaluate_student(student, tokenizer, c, batch_size=4) for c in caches]
    for i, single in enumerate(alone):
        assert both[f"teacher{i}/kd"] == pytest.approx(single["kd"], rel=1e-5)
        assert both[f"teacher{i}/top1_agreement"] == pytest.approx(single["top1_agreement"])
    assert both["kd"] == pytest.approx(0.75 * alone[0]["kd"] + 0.25 * alone[1]["kd"], rel=1e-5)
    assert both["ce"] == pytest.approx(alone[0]["ce"], rel=1e-6)
    argv = ["--student", str(student_dir), "--cache", str(caches[0]), "--cache", str(caches[1]), "--json"]
    assert evaluate_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kd"] == pytest.approx(0.5 * alone[0]["kd"] + 0.5 * alone[1]["kd"], rel=1e-5)
