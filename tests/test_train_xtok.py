"""Cross-tokenizer training end to end: a student whose tokenizer differs from the cache's trains from an existing
cache with no flag beyond --student, and the coverage shows up in TensorBoard."""

from __future__ import annotations

import pytest

from distill.train import main


def test_student_with_other_tokenizer_trains_from_cache(tmp_path, small_topk_cache, other_student, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    argv = ["--student", str(other_student), "--cache", str(small_topk_cache), "--output_dir", str(out), "--use_cpu",
            "--per_device_train_batch_size", "2", "--max_steps", "3", "--logging_steps", "1", "--report_to",
            "tensorboard", "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-3"]
    assert main(argv) == 0, capsys.readouterr().err
    events = EventAccumulator(str(next(out.glob("runs/*")))).Reload()
    aligned = [e.value for e in events.Scalars("train/xtok/aligned_fraction")]
    mapped = [e.value for e in events.Scalars("train/xtok/mapped_mass_fraction")]
    assert len(aligned) == 3 and all(0.3 < a <= 1.0 for a in aligned), aligned
    assert all(0.3 < m <= 1.0 + 1e-6 for m in mapped), mapped
    kd = [e.value for e in events.Scalars("train/loss/kd")]
    assert all(k > 0 for k in kd)  # KD really applied at aligned positions
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.vocab_size == 384
    # The vocabulary map was saved beside the cache, keyed by both tokenizer hashes, for the next run.
    assert len(list((small_topk_cache / "vocab_maps").glob("*-first_token.npz"))) == 1


def test_tail_rule_selectable(tmp_path, small_topk_cache, other_student):
    out = tmp_path / "out"
    argv = ["--student", str(other_student), "--cache", str(small_topk_cache), "--output_dir", str(out), "--use_cpu",
            "--per_device_train_batch_size", "2", "--max_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
            "--save_strategy", "no", "--xtok_rule", "tail"]
    assert main(argv) == 0
    assert len(list((small_topk_cache / "vocab_maps").glob("*-tail.npz"))) == 1


def _final_weights_and_losses(tmp_path, small_topk_cache, other_student, name, batch, accumulation):
    from distill.train import build_trainer
    from distill.training.config import parse_config, validate

    argv = ["--student", str(other_student), "--cache", str(small_topk_cache), "--output_dir", str(tmp_path / name),
            "--use_cpu", "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
            str(accumulation), "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm",
            "true", "--save_strategy", "no", "--learning_rate", "1e-2", "--seed", "0"]
    cfg = parse_config(argv)
    validate(cfg)
    built = build_trainer(cfg)
    built.trainer.train()
    losses = [h["loss"] for h in built.trainer.state.log_history if "loss" in h]
    params = {k: v.detach().clone() for k, v in built.model.student.state_dict().items()}
    return losses, params


def test_gradient_accumulation_weighs_every_token_equally(tmp_path, small_topk_cache, other_student):
    """Student windows differ in length on the cross-tokenizer path: per-micro-batch means would weigh a short
    window's tokens more. With global normalisers, 1 x 4 sequences and 2 x 2 (accumulated) give the same step."""
    losses_a, params_a = _final_weights_and_losses(tmp_path, small_topk_cache, other_student, "a", 4, 1)
    losses_b, params_b = _final_weights_and_losses(tmp_path, small_topk_cache, other_student, "b", 2, 2)
    assert losses_a == pytest.approx(losses_b, rel=1e-5, abs=1e-6)
    worst = max(float((params_a[k] - params_b[k]).abs().max()) for k in params_a)
    assert worst < 1e-5, worst
