"""Trainer callbacks: one-line console logs, the resolved config, early stopping with patience + warm-up (skipping
non-finite steps: `distill.training.nonfinite`)."""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, ProgressCallback

from distill.training.components import COMPONENTS

# Keys shown on the console line (everything else still goes to TensorBoard): each registered component's loss.
CONSOLE_KEYS = ("loss", *(c.tag("loss") for c in COMPONENTS if c.console), "top1_agreement", "teacher_mass_covered",
                "grad_norm", "learning_rate", "tokens_per_second", "eval_loss", "eval_ce", "eval_perplexity", "eval_kd",
                "eval_top1_agreement")


def format_log_line(step: int, logs: dict[str, Any]) -> str:
    """One compact line: `step 20 | loss 3.21 | loss/kd 1.02 | ...` (known keys, in a fixed order)."""
    parts = [f"step {step}"]
    for key in CONSOLE_KEYS:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.4g}")
    if len(parts) == 1:  # e.g. the end-of-training summary: show its numbers
        parts += [f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, (int, float))][:8]
    return " | ".join(parts)


class OneLineProgressCallback(ProgressCallback):
    """Trainer's progress bar, but each log event becomes ONE formatted line instead of a printed dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = format_log_line(state.global_step, logs)
            if self.training_bar is not None:
                self.training_bar.write(line)
            else:
                print(line, flush=True)


class OneLinePrinterCallback(TrainerCallback):
    """Used instead of Trainer's PrinterCallback when the progress bar is disabled."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(format_log_line(state.global_step, logs), flush=True)


def run_summary(history: list[dict[str, Any]], output_dir: str, curves_dir: str | None) -> list[str]:
    """The closing lines of a run: steps, tokens, time, the last training and evaluation losses, and where the
    student, its config and its curves are."""
    last = {key: value for entry in history for key, value in entry.items()}  # the latest value of every key
    train = [f"{key} {last[key]:.4g}" for key in CONSOLE_KEYS[: 1 + sum(c.console for c in COMPONENTS)]
             if isinstance(last.get(key), (int, float))]
    evals = [f"{key} {last[key]:.4g}" for key in ("eval_loss", "eval_ce", "eval_perplexity", "eval_kd")
             if isinstance(last.get(key), (int, float))]
    steps = int(last.get("step", 0))
    tokens = last.get("tokens_seen")
    runtime = last.get("train_runtime")
    head = f"done: {steps} steps" + (f", {tokens / 1e6:.3g} M tokens" if tokens else "") + \
        (f", {runtime:.0f} s" if runtime else "")
    lines = [" | ".join([head, *train, *evals])]
    where = f"student: {output_dir}/student | config: {output_dir}/distill_config.yaml"
    if curves_dir:
        where += f" | curves: tensorboard --logdir {curves_dir}"
    return [*lines, where]


class ResolvedConfigCallback(TrainerCallback):
    """Writes OUTPUT/distill_config.yaml once training has really started (after the engine's set-up, where DeepSpeed
    or device errors surface), so a run that fails to start leaves no config file behind."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from distill.training.config import write_resolved_config

            write_resolved_config(self.cfg, args.output_dir)


class DistillEarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stop when `metric` (lower is better) has not improved by more than `min_delta` for `patience` evaluations.
    Evaluations before `warmup_steps` update the best value but never count towards patience. Its state (best value,
    evaluations without improvement) is saved in checkpoints and restored by `--resume_from_checkpoint`."""

    def __init__(self, patience: int, min_delta: float = 0.0, warmup_steps: int = 0, metric: str = "eval_loss"):
        self.patience = patience
        self.min_delta = min_delta
        self.warmup_steps = warmup_steps
        self.metric = metric
        self.best = math.inf
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def state(self) -> dict:
        return {
            "args": {"patience": self.patience, "min_delta": self.min_delta, "warmup_steps": self.warmup_steps,
                     "metric": self.metric},
            "attributes": {"best": self.best, "bad_evals": self.bad_evals, "stopped_at": self.stopped_at},
        }

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            return
        if value < self.best - self.min_delta:
            self.best = value
            self.bad_evals = 0
            return
        if state.global_step < self.warmup_steps:
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            control.should_training_stop = True
            self.stopped_at = state.global_step
