"""Single-process training on CPU: a full run (stdout, TensorBoard, export), resume, fp16/fp32 evaluation without
autocast, non-finite steps, the kd=0 baseline, LM-only mode, and the bad-input refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cache_fixtures import write_synthetic_cache

from cache_tools.format.errors import NonFiniteLossError
from distill.train import build_trainer, main
from distill.training.config import parse_config, validate

TRAIN_SCALARS = [f"loss/{c}" for c in ("ce", "kd", "feature", "contrastive")] + \
    [f"weighted/{c}" for c in ("ce", "kd", "feature", "contrastive")] + \
    [f"weight/{c}" for c in ("ce", "kd", "feature", "contrastive")] + \
    ["total", "loss", "learning_rate", "grad_norm", "loss_scale", "tokens_per_second", "teacher_mass_covered",
     "top1_agreement"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache"), tokenizer, corpus, num_sequences=32, shard_size=8)


def _argv(student_dir, cache_dir, out, *extra) -> list[str]:
    return ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(out), "--use_cpu",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
            "--disable_tqdm", "true", "--save_strategy", "no", *map(str, extra)]


def _build(argv):
    cfg = parse_config(argv)
    validate(cfg)
    return build_trainer(cfg)


def _losses(history, key="loss"):
    return {h["step"]: h[key] for h in history if key in h and "train_runtime" not in h}


def test_full_run_logs_one_line_per_step_tensorboard_and_export(tmp_path, student_dir, cache_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    argv = _argv(student_dir, cache_dir, out, "--max_steps", 6, "--logging_steps", 2, "--eval_fraction", 0.25,
                 "--eval_strategy", "steps", "--eval_steps", 3, "--feature_weight", 0.5, "--contrastive_weight", 0.2,
                 "--kd_schedule", "linear:0:0.5", "--report_to", "tensorboard", "--disable_tqdm", "false")
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    # The closing summary: steps, tokens, final losses, where the student, its config and its curves are.
    done, where = lines[-2:]
    assert done.startswith("done: 6 steps, ") and " M tokens" in done and "| loss " in done and "| eval_loss " in done
    assert where == (f"student: {out}/student | config: {out}/distill_config.yaml | curves: tensorboard --logdir "
                     f"{out}/runs")
    lines = lines[:-2]
    # 3 training logs + 2 evaluations + the end-of-training summary, one line each.
    assert len(lines) == 6, lines
    assert all(ln.startswith("step ") for ln in lines)
    assert sum("eval_perplexity" in ln for ln in lines) == 2

    events = EventAccumulator(str(next(out.glob("runs/*")))).Reload()
    tags = set(events.Tags()["scalars"])
    missing = [k for k in TRAIN_SCALARS if f"train/{k}" not in tags]
    assert not missing, (missing, sorted(tags))
    for key in ("perplexity", "kd", "top1_agreement", "loss"):
        assert f"eval/{key}" in tags
    kd_weights = [e.value for e in events.Scalars("train/weight/kd")]
    assert kd_weights[0] < kd_weights[-1] == pytest.approx(1.0)  # the linear ramp reached its base weight

    resolved = (out / "distill_config.yaml").read_text()
    assert "feature_weight: 0.5" in resolved
    exported = AutoModelForCausalLM.from_pretrained(out / "student")
    initial = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not torch.equal(exported.model.norm.weight, initial.model.norm.weight)  # trained weights, not the start
    assert (out / "student" / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "projection_heads.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("layers.0.weight").shape == (64, 48)  # teacher hidden x student hidden
    assert len([k for k in keys if k.endswith("weight")]) == 3
    with safe_open(str(out / "student" / "model.safetensors"), "pt") as f:
        assert not any("projection" in k for k in f.keys())


def test_resume_gives_the_same_losses(tmp_path, student_dir, cache_dir):
    straight = _build(_argv(student_dir, cache_dir, tmp_path / "a", "--max_steps", 10, "--logging_steps", 1,
                            "--save_strategy", "steps", "--save_steps", 5))
    straight.trainer.train()
    resumed = _build(_argv(student_dir, cache_dir, tmp_path / "b", "--max_steps", 10, "--logging_steps", 1))
    resumed.trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    for key in ("loss", "loss/kd", "loss/ce"):
        a, b = _losses(straight.trainer.state.log_history, key), _losses(resumed.trainer.state.log_history, key)
        steps = [6, 7, 8, 9, 10]
        assert [a[s] for s in steps] == pytest.approx([b[s] for s in steps], rel=1e-6, abs=1e-7), key


def test_eval_in_fp16_and_fp32_without_autocast(tmp_path, student_dir, cache_dir):
    built = _build(_argv(student_dir, cache_dir, tmp_path, "--max_steps", 1, "--eval_fraction", 0.25))
    fp32 = built.trainer.evaluate()
    model = built.model.eval()
    batch = built.trainer.data_collator([built.data.eval[i] for i in range(2)])
    plain = model(**batch)["ce"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = model(**batch)["ce"]
    assert torch.equal(plain, inside)  # the model switches autocast off in eval mode
    model.half()
    fp16 = built.trainer.evaluate()
    for key in ("eval_perplexity", "eval_kd", "eval_loss"):
        assert torch.isfinite(torch.tensor(fp16[key]))
        assert fp16[key] == pytest.approx(fp32[key], rel=2e-2), key
    assert fp16["eval_top1_agreement"] == pytest.approx(fp32["eval_top1_agreement"], abs=0.05)
    assert fp32["eval_perplexity"] == pytest.approx(torch.tensor(fp32["eval_ce"]).exp().item(), rel=1e-5)


def _nan_on_calls(model, calls: set[int]):
    count = {"n": 0}

    def hook(module, args, output):
        count["n"] += 1
        return output * float("nan") if count["n"] - 1 in calls else output

    return model.student.model.norm.register_forward_hook(hook)


def test_single_nonfinite_step_is_skipped_and_counted(tmp_path, student_dir, cache_dir):
    from transformers import TrainerCallback

    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = built.model.student.model.norm.weight.detach().clone()

    built = _build(_argv(student_dir, cache_dir, tmp_path, "--max_steps", 3, "--logging_steps", 1))
    built.trainer.add_callback(Snapshot())
    _nan_on_calls(built.model, {1})
    built.trainer.train()
    assert built.trainer.nonfinite_total == 1
    assert torch.equal(snapshots[1], snapshots[2])  # step 2 skipped: not even Adam's momentum moved the weights
    assert not torch.equal(snapshots[2], snapshots[3])
    assert built.trainer.state.log_history[-2]["nonfinite_skipped"] == 1


def test_run_of_nonfinite_losses_aborts(tmp_path, student_dir, cache_dir):
    built = _build(_argv(student_dir, cache_dir, tmp_path, "--max_steps", 10, "--max_nonfinite_steps", 3))
    before = built.model.student.model.norm.weight.detach().clone()
    _nan_on_calls(built.model, set(range(100)))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        built.trainer.train()
    assert torch.equal(before, built.model.student.model.norm.weight)


def test_kd_weight_zero_is_exactly_lm_only(tmp_path, student_dir, cache_dir):
    built = _build(_argv(student_dir, cache_dir, tmp_path, "--max_steps", 1))
    model = built.model.train()
    batch = built.trainer.data_collator([built.data.train[i] for i in range(3)])
    grads = []
    for inputs in (batch, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}):
        model.zero_grad()
        out = model(**inputs, loss_weights={"ce": 1.0, "kd": 0.0})
        out["loss"].backward()
        grads.append((out["loss"].detach(), [p.grad.clone() for p in model.student.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))


def test_lm_only_mode_on_plain_text(tmp_path, student_dir, tokenizer_dir, text_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lm"
    argv = ["--student_config", str(student_dir / "config.json"), "--tokenizer", str(tokenizer_dir),
            "--dataset", str(text_file), "--max_length", "32", "--kd_weight", "0", "--output_dir", str(out),
            "--use_cpu", "--max_steps", "3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
            "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
    assert main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.hidden_size == 48


def _bad_caches(tmp_path, tokenizer, corpus):
    return {
        "incomplete": (write_synthetic_cache(tmp_path / "inc", tokenizer, corpus, num_sequences=8, complete=False),
                       "incomplete"),
        "tokenizer": (write_synthetic_cache(tmp_path / "tok", tokenizer, corpus, num_sequences=8,
                                            tokenizer_hash="0" * 64), "cannot load"),
        "vocab": (write_synthetic_cache(tmp_path / "voc", tokenizer, corpus, num_sequences=8,
                                        vocab_size=len(tokenizer) + 16), "larger than the student"),
        "nan": (write_synthetic_cache(tmp_path / "nan", tokenizer, corpus, num_sequences=8, nan_sequence=0),
                "NaN/Inf"),
    }


def test_bad_caches_fail_with_one_line(tmp_path, student_dir, tokenizer, corpus, capsys):
    for name, (cache, needle) in _bad_caches(tmp_path, tokenizer, corpus).items():
        argv = _argv(student_dir, cache, tmp_path / f"out-{name}", "--max_steps", 2,
                     "--per_device_train_batch_size", 8)
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        # Library progress bars may precede it (the NaN shard is met at the first batch, after the model loads).
        assert [ln for ln in err if ln.startswith("python -m distill.train: error: ")] == err[-1:], (name, err)
        assert needle in err[-1], (name, err)
        assert not (tmp_path / f"out-{name}" / "student").exists()


def test_cli_exit_code_for_unknown_yaml_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("student: x\ncache: y\noutput_dir: z\nlearning_rat: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "distill.train", str(config)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "learning_rat" in proc.stderr and proc.stdout == ""


def test_early_stopping_patience_min_delta_and_warmup():
    from transformers import TrainerControl, TrainerState

    from distill.training.callbacks import DistillEarlyStoppingCallback

    def run(values, **kw):
        cb, state, control = DistillEarlyStoppingCallback(**kw), TrainerState(), TrainerControl()
        for i, v in enumerate(values, start=1):
            state.global_step = 10 * i
            cb.on_evaluate(None, state, control, metrics={"eval_loss": v})
            if control.should_training_stop:
                return state.global_step
        return None

    assert run([3.0, 2.0, 2.5, 2.4, 1.0], patience=2) == 40
    assert run([3.0, 2.95, 2.94], patience=1, min_delta=0.1) == 20  # 0.05 is not an improvement
    assert run([3.0, 3.0, 3.0, 3.0], patience=1, warmup_steps=35) == 40  # evaluations before step 35 don't count
    assert run([3.0, 2.0, 1.0], patience=1) is None


def test_standalone_evaluate_matches_trainer_eval_in_fp32_and_fp16(tmp_path, student_dir, cache_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from distill.evaluate import evaluate_student

    built = _build(_argv(student_dir, cache_dir, tmp_path, "--max_steps", 1, "--eval_cache", cache_dir))
    trainer_metrics = built.trainer.evaluate()
    fp32 = evaluate_student(AutoModelForCausalLM.from_pretrained(student_dir), tokenizer, cache_dir, batch_size=5)
    assert fp32["sequences"] == 32
    for key in ("perplexity", "kd", "top1_agreement", "teacher_mass_covered", "loss"):
        assert fp32[key] == pytest.approx(trainer_metrics[f"eval_{key}"], rel=1e-5), key
    fp16 = evaluate_student(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float16), tokenizer,
                            cache_dir, max_sequences=8)
    assert fp16["sequences"] == 8 and fp16["perplexity"] == pytest.approx(fp32["perplexity"], rel=5e-2)


def test_evaluate_cli_uses_the_runs_kd_settings(tmp_path, student_dir, cache_dir, capsys):
    """`python -m distill.evaluate --student OUT` (a run folder): the KD kind and temperature come from
    OUT/distill_config.yaml, the cache from its --eval_cache, and the numbers equal the trainer's own eval."""
    import json

    from distill import evaluate

    out = tmp_path / "run"
    assert main(_argv(student_dir, cache_dir, out, "--max_steps", 2, "--eval_cache", cache_dir, "--kd_kind",
                      "reverse_kl", "--temperature", 2.0, "--eval_strategy", "steps", "--eval_steps", 2,
                      "--save_strategy", "steps", "--save_steps", 2)) == 0
    capsys.readouterr()
    assert evaluate.main(["--student", str(out), "--batch_size", "5", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["kd_kind"] == "reverse_kl" and metrics["temperature"] == 2.0 and metrics["sequences"] == 32
    from_trainer = [h for h in built_history(out) if "eval_kd" in h][-1]
    assert metrics["kd"] == pytest.approx(from_trainer["eval_kd"], rel=1e-5)
    assert evaluate.main(["--student", str(out / "student"), "--temperature", "1", "--json"]) == 0  # parent: config
    assert json.loads(capsys.readouterr().out)["kd"] != pytest.approx(metrics["kd"], rel=1e-3)
    assert evaluate.main(["--student", str(tmp_path / "nowhere"), "--cache", str(cache_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
    assert err[0].startswith("python -m distill.evaluate: error: --student")


def built_history(out: Path) -> list[dict]:
    """The log history of a finished run (the trainer_state.json of its last checkpoint)."""
    import json

    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())["log_history"]


def test_sampled_cache_trains_with_its_target_kind(tmp_path, student_dir, tokenizer, corpus):
    """A sampled (RS-KD) cache: the model's KDConfig carries targets="sampled" (no tail bucket, counts/N as the
    teacher), KD is computed and finite."""
    from cache_tools.format import schema

    targets = schema.TargetsInfo(kind="sampled", encoding="fp16", top_k=0, num_samples=16, sample_temperature=1.0)
    cache = write_synthetic_cache(tmp_path / "c", tokenizer, corpus, num_sequences=8, targets=targets)
    built = _build(_argv(student_dir, cache, tmp_path / "o", "--max_steps", 2, "--logging_steps", 1))
    assert built.model.kd_config.targets == "sampled"
    built.trainer.train()
    kd = _losses(built.trainer.state.log_history, "loss/kd")
    assert sorted(kd) == [1, 2] and all(torch.isfinite(torch.tensor(v)) and v > 0 for v in kd.values())
