"""Native AMP (autocast) training, evaluation without gradient buffers, and validation of review findings."""

from __future__ import annotations

import math

import pytest
import torch
from cache_fixtures import write_synthetic_cache

from cache_tools.format.errors import ConfigError
from distill.losses import fused_ce_kd_loss
from distill.train import main
from distill.training.config import parse_config, validate


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


class _Fp16Probe:
    """Injects two overflows into a `--fp16 --use_cpu` run and records what the loss scaler and the weights did.

    Step OVERFLOW_STEP: every gradient of one parameter becomes inf (what an fp16 overflow in backward produces);
    step INF_LOSS_STEP: the loss itself is inf (a non-finite loss must go through the scaler, not crash it)."""

    OVERFLOW_STEP, INF_LOSS_STEP = 1, 2  # global_step while the step runs (0-based)

    def __init__(self) -> None:
        from transformers import TrainerCallback

        probe = self
        self.scales: dict[int, tuple[float, float]] = {}  # step -> (scale before, scale after)
        self.weight_change: dict[int, float] = {}
        self.lr: dict[int, tuple[float, float]] = {}  # step -> (learning rate before, after)
        self.autocast: dict[bool, set] = {True: set(), False: set()}  # training? -> {(enabled, dtype)}
        self.built = None

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                param = model.student.get_input_embeddings().weight
                param.register_hook(lambda g: g * float("inf") if state.global_step == probe.OVERFLOW_STEP else g)
                model.student.get_input_embeddings().register_forward_pre_hook(probe._record_autocast)

            def on_step_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
                probe._before = [p.detach().clone() for p in model.parameters()]
                probe._lr = lr_scheduler.get_last_lr()[0]
                probe._scale = probe.built.trainer.accelerator.scaler.get_scale()

            def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
                step = state.global_step - 1
                probe.lr[step] = (probe._lr, lr_scheduler.get_last_lr()[0])
                probe.scales[step] = (probe._scale, probe.built.trainer.accelerator.scaler.get_scale())
                probe.weight_change[step] = max(float((p.detach() - q).abs().max())
                                                for p, q in zip(model.parameters(), probe._before, strict=True))

        self.callback = Callback()

    def _record_autocast(self, module, args):
        self.autocast[module.training].add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    def install(self, monkeypatch) -> None:
        """Wrap `distill.train.build_trainer` so `main()` (the real entry point) builds the probed trainer."""
        import distill.train as train_module

        original = train_module.build_trainer

        def build(cfg, **kwargs):
            built = original(cfg, extra_callbacks=[self.callback])
            forward = built.model.forward

            def inf_loss_forward(*args, **kw):
                out = forward(*args, **kw)
                if built.model.training and built.trainer.state.global_step == self.INF_LOSS_STEP:
                    out["loss"] = out["loss"] * float("inf")
                return out

            built.model.forward = inf_loss_forward
            self.built = built
            return built

        monkeypatch.setattr(train_module, "build_trainer", build)


def test_p100_fp16_recipe_on_cpu(tmp_path, student_dir, cache_dir, monkeypatch):
    """The P100 recipe's precision path (launch/recipes/kaggle_p100.yaml: fp16 + dynamic loss scaling, aux losses,
    evaluation during training, early stopping), run on CPU with `--fp16 true --use_cpu true`: training runs under
    fp16 autocast, each injected overflow halves the loss scale and leaves every weight (and the LR schedule)
    untouched, evaluation runs outside autocast, early stopping stops the run, and the exported student loads."""
    from transformers import AutoModelForCausalLM

    probe = _Fp16Probe()
    probe.install(monkeypatch)
    out = tmp_path / "p100"
    argv = ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(out), "--use_cpu", "true",
            "--fp16", "true", "--feature_weight", "0.1", "--contrastive_weight", "0.05", "--max_steps", "8",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--eval_fraction", "0.25", "--eval_strategy", "steps", "--eval_steps", "2",
            "--early_stopping_patience", "1", "--early_stopping_min_delta", "100", "--early_stopping_warmup_steps", "3",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    assert main(argv) == 0

    # Training really ran in fp16 autocast (accelerate alone leaves CPU fp16 runs in fp32); evaluation did not.
    assert probe.autocast[True] == {(True, torch.float16)}
    assert probe.autocast[False] and all(not enabled for enabled, _ in probe.autocast[False])
    # Each overflow: the scale halves and no weight moves (moments neither: the optimizer step is skipped).
    overflow, inf_loss = probe.OVERFLOW_STEP, probe.INF_LOSS_STEP
    assert probe.scales[overflow] == (2.0**16, 2.0**15) and probe.weight_change[overflow] == 0.0
    assert probe.scales[inf_loss] == (2.0**15, 2.0**14) and probe.weight_change[inf_loss] == 0.0
    normal = [s for s in probe.scales if s not in (overflow, inf_loss)]
    assert normal and all(probe.weight_change[s] > 0 and probe.scales[s][0] == probe.scales[s][1] for s in normal)
    # A skipped step does not advance the LR schedule (the fused optimizer skips silently: SkippedStepCallback).
    assert all(probe.lr[s][0] == probe.lr[s][1] for s in (overflow, inf_loss))
    assert all(probe.lr[s][0] > probe.lr[s][1] for s in normal)  # linear decay
    history = probe.built.trainer.state.log_history
    train_logs = {h["step"]: h for h in history if "loss" in h}
    assert train_logs[overflow + 1]["loss_scale"] == 2.0**15 and train_logs[inf_loss + 1]["loss_scale"] == 2.0**14
    assert train_logs[inf_loss + 1]["nonfinite_skipped"] == 2  # both micro-batches of that step
    # Evaluation happened (steps 2 and 4) with finite metrics; early stopping ended the run at the second one.
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4] and all(math.isfinite(h["eval_loss"]) for h in evals)
    assert probe.built.trainer.state.global_step == 4
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in student.parameters())
