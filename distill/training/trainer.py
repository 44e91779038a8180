"""`DistillTrainer`: transformers.Trainer whose loss is CE + KD (fused) + feature + contrastive, each weight scheduled.

The model is a `distill.training.modeling.DistillModel`, which computes every loss inside its forward (see that
module for why); this class feeds it the scheduled weights, keeps per-component running metrics for logging, skips
non-finite steps, and adds KD metrics to evaluation.

Loss normalisation: CE and KD are means over the GLOBAL batch of one optimizer step: `get_batch_samples` counts
label tokens and KD rows over all gradient-accumulation micro-batches and all data-parallel ranks and hands them to
each micro-batch as its `ce_denominator` / `kd_denominator` fields; each micro-batch's summed CE/KD is divided by
those counts (times the world size, which DDP/DeepSpeed's gradient averaging divides back out). So windows of
different lengths (cross-tokenizer batches) weigh every token equally, and N ranks x B equals 1 rank x N*B. The
auxiliary losses are per-sequence means of each micro-batch, divided by the accumulation steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from distill.data.dataset import XTOK_STATS, teacher_key
from distill.data.multi import num_teachers
from distill.losses import IGNORE_INDEX
from distill.training.components import COMPONENTS
from distill.training.metrics import MetricAccumulator, TrainingLog, loss_scale, scheduled_weights
from distill.training.nonfinite import NonFiniteSteps, make_deepspeed_skip_nonfinite_steps

# Batch fields `get_batch_samples` adds: the optimizer step's global label-token and KD-row counts (int64, so that
# Trainer's input preparation never casts them to a half-precision DeepSpeed dtype).
COUNT_FIELDS = ("ce_denominator", "kd_denominator")


def _data_parallel_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SkipBackward(Exception):
    """Raised by `compute_loss` for a non-finite loss that must not be backpropagated; `training_step` catches it."""


class DistillTrainer(Trainer):
    """Args (beyond Trainer's): loss_args (`distill.training.config.LossArguments`): base weights, schedules,
    abort limit.

    Overrides only Trainer's extension points: `compute_loss` (the one place the model is called; finite check),
    `training_step` (a skipped micro-batch reports 0), `get_batch_samples` (global CE/KD counts),
    `prediction_step` and `evaluation_loop` (token-weighted eval metrics), `log` (extra scalars); plus `_save`, see
    there why. `nonfinite` (`distill.training.nonfinite.NonFiniteSteps`) is the record `SkipStepCallback` reads."""

    # compute_loss returns the loss already scaled for the optimizer step (divided by the global counts, or by the
    # accumulation steps): Trainer's training_step must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, loss_args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_args = loss_args
        self.nonfinite = NonFiniteSteps(loss_args.max_nonfinite_steps)
        self.train_log = TrainingLog()
        self._eval_metrics = MetricAccumulator()
        if self.is_deepspeed_enabled:
            make_deepspeed_skip_nonfinite_steps(self.accelerator.state.deepspeed_plugin.deepspeed_config)

    @property
    def nonfinite_total(self) -> int:
        return self.nonfinite.total

    # -- weights ------------------------------------------------------------------------------------------------
    def current_loss_weights(self) -> dict[str, float]:
        total = self.state.max_steps or 1
        return scheduled_weights(self.loss_args, step=self.state.global_step, total_steps=total)

    def eval_loss_weights(self) -> dict[str, float]:
        """Evaluation loss = base weights of the fused CE+KD components (no ramp, no aux), so eval_loss is
        comparable across steps."""
        return {c.name: float(getattr(self.loss_args, c.weight_field)) if c.source == "cekd" else 0.0
                for c in COMPONENTS}

    # -- the loss -----------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Training: the scheduled weights; the loss to backpropagate, scaled for the optimizer step (CE/KD divided
        by the batch's global counts, `COUNT_FIELDS`). Evaluation: `eval_loss_weights`, token-weighted sums kept."""
        xtok_stats = inputs.pop(XTOK_STATS, None)
        if not model.training:
            _mask_padding_samples(inputs, self._padding_samples(int(inputs["input_ids"].shape[0])))
        weights = self.current_loss_weights() if model.training else self.eval_loss_weights()
        outputs = model(**inputs, loss_weights=weights)
        outputs["weights"] = weights
        if model.training:
            self.train_log.add_xtok(xtok_stats)
            loss = self._training_loss(outputs, inputs)
        else:
            self._eval_metrics.add_eval(outputs)
            loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def _training_loss(self, outputs: dict[str, torch.Tensor], inputs: dict[str, Any]) -> torch.Tensor:
        if not self.nonfinite.check(outputs["loss"], self.state.global_step):
            if not NonFiniteSteps.backward_needed(self.accelerator):
                raise _SkipBackward
            return outputs["loss"]  # its non-finite gradients make DeepSpeed / the GradScaler skip the step
        self.train_log.add_step(outputs, outputs["weights"], float(inputs["attention_mask"].sum()))
        if COUNT_FIELDS[0] not in inputs:
            return outputs["loss"] / self.current_gradient_accumulation_steps
        # CE/KD are already divided by the global counts: undo the ranks' gradient averaging; the aux losses are
        # per-micro-batch means.
        return outputs["cekd_loss"] * _data_parallel_world_size() + (
            outputs["aux_loss"] / self.current_gradient_accumulation_steps)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's step (input preparation, `compute_loss`, backward); a skipped micro-batch reports a loss of 0."""
        self.train_log.start()
        skipped = self.nonfinite.total
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except _SkipBackward:
            return torch.zeros((), device=self.args.device)
        return torch.zeros_like(loss) if self.nonfinite.total != skipped else loss

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step, each given the step's label tokens and KD rows summed over the
        micro-batches and the data-parallel ranks (read from torch.distributed: some launchers leave the
        Accelerator's count at 1) as `COUNT_FIELDS`. Trainer's own count (`num_items_in_batch`) stays None."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, None
        teachers = max(num_teachers(batch_samples[0]), 1)  # several caches: one KD-row count per teacher
        counts = torch.zeros(1 + teachers, dtype=torch.int64)
        for batch in batch_samples:
            counts[0] += int((batch["labels"] != IGNORE_INDEX).sum())
            for t in range(num_teachers(batch)):
                kd_mask, ids = batch[teacher_key(t, "kd_mask")], batch[teacher_key(t, "topk_ids")]
                counts[1 + t] += int((kd_mask.bool() & (ids >= 0).any(-1)).sum())
        counts = counts.to(device)
        if _data_parallel_world_size() > 1:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        counts = counts.clamp_min(1)
        fields = [*COUNT_FIELDS, *(teacher_key(t, COUNT_FIELDS[1]) for t in range(1, teachers))]
        for batch in batch_samples:
            batch.update(zip(fields, counts, strict=True))
        return batch_samples, None

    # -- logging ------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            scale = loss_scale(self.accelerator, getattr(self, "deepspeed", None))
            logs.update(self.train_log.extras(self.accelerator, self.args.device, loss_scale=scale,
                                              nonfinite_total=self.nonfinite.total))
        super().log(logs, start_time)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """safetensors refuses tensors that share memory (tied embeddings): store each shared tensor once per key.
        Private override because no public hook sits between Trainer gathering the state dict (ZeRO-3 included) and
        writing it; `DistillModel` is no `PreTrainedModel`, so Trainer writes the raw state dict with safetensors."""
        state_dict = self.model.state_dict() if state_dict is None else state_dict
        seen: set[tuple[int, int]] = set()
        untied = {}
        for key, tensor in state_dict.items():
            ident = (tensor.data_ptr(), tensor.numel())
            untied[key] = tensor.clone() if ident in seen else tensor
            seen.add(ident)
        super()._save(output_dir, state_dict=untied)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """One eval batch through Trainer's own step, loss only (`compute_loss` keeps the token-weighted sums; the
        model itself disables autocast in eval mode). The samples accelerate repeats to give every rank an even last
        batch are masked out there (no tokens counted)."""
        return super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)

    def _padding_samples(self, batch_size: int) -> torch.Tensor | None:
        """[B] bool, True for this rank's samples that are copies added by accelerate's even batches (what
        `accelerator.gather_for_metrics` drops: in the last batch, the global positions rank * B + i >= remainder,
        the real sample count of the last global batch). None when there are none."""
        acc = self.accelerator
        state = acc.gradient_state
        if acc.num_processes <= 1 or not state.end_of_dataloader or state.remainder <= 0:
            return None
        positions = acc.process_index * batch_size + torch.arange(batch_size)
        padding = positions >= state.remainder
        return padding if bool(padding.any()) else None

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Trainer's loop (it calls `prediction_step`), then our token-weighted metrics replace its per-batch mean
        (before `evaluate` logs them and the callbacks, early stopping included, see them)."""
        self._eval_metrics.reset()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        teacher_weights = getattr(self.accelerator.unwrap_model(self.model), "teacher_weights", None)
        for key, value in self._eval_metrics.eval_summary(self.accelerator, self.eval_loss_weights(),
                                                          teacher_weights).items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        self._eval_metrics.reset()
        return output


def _mask_padding_samples(inputs: dict[str, Any], padding: torch.Tensor | None) -> None:
    """Give the padding samples no CE label and no KD row, so they add nothing to the token-weighted sums (the
    forward still runs on every rank: ZeRO-3 gathers parameters collectively)."""
    if padding is None:
        return
    padding = padding.to(inputs["labels"].device)
    inputs["labels"] = inputs["labels"].masked_fill(padding[:, None], IGNORE_INDEX)
    for t in range(num_teachers(inputs)):
        key = teacher_key(t, "kd_mask")
        inputs[key] = inputs[key].masked_fill(padding[:, None], False)


__all__ = ["COUNT_FIELDS", "DistillTrainer"]
