"""Native AMP (autocast) training, evaluation without gradient buffers, and validation of review findings."""

from __future__ import annotations

import pytest
import torch
from cache_fixtures import write_synthetic_cache

from distill.losses import fused_ce_kd_loss
from distill.train import main
from distill.training.config import ConfigError, parse_config, validate


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("amp") / "c", tokenizer, corpus, num_sequences=8)


def test_bf16_autocast_training_runs(tmp_path, student_dir, cache_dir):
    """Accelerate's native mixed precision wraps the forward in autocast: the fused loss must still build its
    logits in fp32 (a half-precision matmul result used to crash the kernel's scatter)."""
    argv = ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(tmp_path / "o"),
            "--use_cpu", "--bf16", "true", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--feature_weight", "0.1", "--contrastive_weight", "0.1", "--report_to", "none", "--disable_tqdm",
            "true", "--save_strategy", "no"]
    assert main(argv) == 0


def test_fused_loss_under_autocast_and_no_grad():
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (6,))
    ids = torch.randint(0, 20, (6, 4))
    lp = torch.log_softmax(torch.randn(6, 4), -1) - 0.5
    tail = torch.full((6,), -1.0)
    mask = torch.ones(6, dtype=torch.bool)
    plain = fused_ce_kd_loss(hidden, weight, labels, ids, lp, tail, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = fused_ce_kd_loss(hidden, weight, labels, ids, lp, tail, mask)
    assert amp.loss.dtype == torch.float32 and torch.allclose(amp.loss, plain.loss)
    with torch.no_grad():
        evaluated = fused_ce_kd_loss(hidden, weight, labels, ids, lp, tail, mask)
    assert not evaluated.loss.requires_grad and torch.allclose(evaluated.loss, plain.loss)


def test_validation_catches_early_stopping_without_evaluations_and_infinite_temperature(tmp_path):
    cfg = parse_config(["--student", "s", "--cache", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                        "--eval_fraction", "0.25", "--early_stopping_patience", "2", "--temperature", "inf"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "--eval_strategy steps" in str(info.value) and "--temperature" in str(info.value)


def test_early_stopping_state_survives_a_checkpoint(tmp_path):
    """Trainer saves ExportableState callbacks in trainer_state.json and rebuilds them on resume (on by default
    here): patience must not restart after a resume."""
    from transformers import TrainerControl, TrainerState

    from distill.training.callbacks import DistillEarlyStoppingCallback
    from distill.training.config import parse_config

    cb = DistillEarlyStoppingCallback(patience=3, min_delta=0.01, warmup_steps=0)
    state, control = TrainerState(), TrainerControl()
    for step, loss in ((1, 2.0), (2, 2.5), (3, 2.4)):
        state.global_step = step
        cb.on_evaluate(None, state, control, metrics={"eval_loss": loss})
    saved = cb.state()
    restored = DistillEarlyStoppingCallback(**saved["args"])
    for key, value in saved["attributes"].items():
        setattr(restored, key, value)
    assert (restored.best, restored.bad_evals) == (2.0, 2)
    state.global_step = 4
    restored.on_evaluate(None, state, control, metrics={"eval_loss": 2.3})
    assert control.should_training_stop  # the third evaluation without improvement, counting the two before resume
    cfg = parse_config(["--student", "s", "--cache", "c", "--output_dir", str(tmp_path)])
    assert cfg.training.restore_callback_states_from_checkpoint
