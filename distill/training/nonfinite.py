"""Skipping optimizer steps whose loss or gradients are not finite, in one place.

`NonFiniteSteps` is the one record of them: the trainer asks it whether a micro-batch's loss is finite on every rank
(`check`), it counts them and aborts a run of them (`NonFiniteLossError`), and `SkipStepCallback` reads it to drop
the step. How a step is skipped depends on who owns the gradients:
- plain torch optimizers: the callback sets every `.grad` to None before the step, so neither moments nor weight
  decay move (a true skip);
- an fp16 GradScaler: it sees the overflow itself and skips. With a fused optimizer (transformers' default
  adamw_torch_fused) the scaler hands the overflow flag to the optimizer, which skips silently; accelerate then
  cannot tell and the LR schedule would advance, so the callback marks the step skipped when the scale dropped;
- DeepSpeed steps inside backward and keeps its own gradient buffers: the non-finite loss is backpropagated and its
  overflow check skips the step, which `make_deepspeed_skip_nonfinite_steps` turns on in every precision.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from cache_tools.format.errors import NonFiniteLossError


class NonFiniteSteps:
    """Counts non-finite micro-batch losses; `skip_step` says the current optimizer step must be skipped."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self.skip_step = False

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """Whether `loss` is finite on EVERY rank (they must agree: a rank that skipped backward alone would deadlock
        the others' gradient all-reduce). Records a non-finite one; NonFiniteLossError after `max_in_a_row`."""
        flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if flag.item() > 0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        self.skip_step = True
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row at step {step} ({self.total} in total); lower "
                "--learning_rate, use --bf16 instead of --fp16, or check the data (raise --max_nonfinite_steps to "
                "tolerate more)")
        return False

    @staticmethod
    def backward_needed(accelerator: Any) -> bool:
        """Whether a non-finite loss must still be backpropagated: DeepSpeed steps INSIDE backward at the
        accumulation boundary (skipping it would desync its micro-step count and leak this window's gradients into
        the next), and an fp16 GradScaler must see the overflow (with no gradients at all its update() asserts).
        Their own overflow checks then skip the step."""
        return accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.scaler is not None


class SkipStepCallback(TrainerCallback):
    """Skips the optimizer step `steps` marked (see the module docstring), and marks a step skipped when an fp16
    GradScaler backed off during it (it backs off exactly on the steps it skips)."""

    def __init__(self, trainer: Any, steps: NonFiniteSteps) -> None:
        self.trainer = trainer
        self.steps = steps
        self._scale: float | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler
        if scaler is not None:
            self._scale = scaler.get_scale()
        elif self.steps.skip_step:
            for param in self.trainer.model.parameters():
                param.grad = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        scaler = self.trainer.accelerator.scaler
        if scaler is not None and self._scale is not None and scaler.get_scale() < self._scale:
            self.trainer.optimizer._is_overflow = True  # accelerate's AcceleratedOptimizer: `step_was_skipped`

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.skip_step = False


def make_deepspeed_skip_nonfinite_steps(ds_config: dict) -> None:
    """A non-finite loss reaches DeepSpeed as non-finite gradients; make sure its overflow check then skips the step
    in every precision: fp16 always checks, ZeRO-3 and fp32 ZeRO-1/2 treat a non-finite gradient norm as an
    overflow, bf16 does when `bf16.check_grad_overflow` is on (forced here) and ZeRO-1/2 only while
    `compute_grad_norm` is on (forced here)."""
    bf16 = ds_config.get("bf16")
    if isinstance(bf16, dict):
        bf16["check_grad_overflow"] = True
    zero = ds_config.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
        zero["compute_grad_norm"] = True
