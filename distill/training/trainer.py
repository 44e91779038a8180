"""`DistillTrainer`: transformers.Trainer whose loss is CE + KD (fused) + feature + contrastive, each weight scheduled.

The model is a `distill.training.modeling.DistillModel`, which computes every loss inside its forward (see that
module for why); this class feeds it the scheduled weights, keeps per-component running metrics for logging, skips
non-finite steps, and adds KD metrics to evaluation.

Loss normalisation: CE and KD are means over the GLOBAL batch of one optimizer step: `_get_num_items_in_batch`
counts label tokens and KD rows over all gradient-accumulation micro-batches and all data-parallel ranks, and each
micro-batch's summed CE/KD is divided by those counts (times the world size, which DDP/DeepSpeed's gradient averaging
divides back out). So windows of different lengths (cross-tokenizer batches) weigh every token equally, and N ranks x
B equals 1 rank x N*B. The auxiliary losses are per-sequence means of each micro-batch, divided by the accumulation
steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from cache_tools.format.errors import NonFiniteLossError
from distill.data.dataset import XTOK_STATS
from distill.losses import IGNORE_INDEX
from distill.training.components import COMPONENTS
from distill.training.metrics import MetricAccumulator, scheduled_weights


def _data_parallel_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1



class DistillTrainer(Trainer):
    """Args (beyond Trainer's): loss_args (`distill.training.config.LossArguments`): base weights, schedules,
    abort limit.

    Overrides only Trainer's extension points: `compute_loss` (the one place the model is called),
    `training_step` (finite check + skip), `get_batch_samples` (global CE/KD counts), `prediction_step` and
    `evaluation_loop` (token-weighted eval metrics), `log` (extra scalars); plus `_save`, see there why."""

    def __init__(self, *args: Any, loss_args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_args = loss_args
        self._train_metrics = MetricAccumulator()
        self._eval_metrics = MetricAccumulator()
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.skip_this_step = False  # read (and reset) by SkipNonFiniteCallback
        self._tokens_since_log = 0.0
        self._last_log_time: float | None = None
        self._xtok_sums: torch.Tensor | None = None  # [4] cross-tokenizer coverage sums since the last log
        self._weight_sums: dict[str, float] = {}
        self._weight_count = 0
        # compute_loss returns a per-micro-batch mean: let Trainer divide it by gradient_accumulation_steps.
        self.loss_is_scaled_for_ga = False
        if self.is_deepspeed_enabled:
            _make_deepspeed_skip_nonfinite_steps(self.accelerator.state.deepspeed_plugin.deepspeed_config)

    # -- weights ------------------------------------------------------------------------------------------------
    def current_loss_weights(self) -> dict[str, float]:
        total = self.state.max_steps or 1
        return scheduled_weights(self.loss_args, step=self.state.global_step, total_steps=total)

    def eval_loss_weights(self) -> dict[str, float]:
        """Evaluation loss = base weights of the fused CE+KD components (no ramp, no aux), so eval_loss is
        comparable across steps."""
        return {c.name: float(getattr(self.loss_args, c.weight_field)) if c.source == "cekd" else 0.0
                for c in COMPONENTS}

    # -- training -----------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The model's weighted loss (training: scheduled weights; eval: `eval_loss_weights`). `num_items_in_batch`
        is `get_batch_samples`'s [label tokens, KD rows] of the optimizer step: CE/KD are divided by those."""
        weights = self.current_loss_weights() if model.training else self.eval_loss_weights()
        inputs = {k: v for k, v in inputs.items() if k != XTOK_STATS}
        counts = num_items_in_batch if torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 2 else None
        if counts is not None:
            inputs.update(ce_denominator=counts[0].clamp_min(1.0), kd_denominator=counts[1].clamp_min(1.0))
        outputs = model(**inputs, loss_weights=weights)
        outputs["weights"] = weights
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward, check the loss is finite on EVERY rank, then backward (or skip the whole step)."""
        model.train()
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()  # tokens/s of the first logging window counts from here
        inputs = self._prepare_inputs(inputs)
        self._add_xtok_stats(inputs.pop(XTOK_STATS, None))
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        weights = outputs["weights"]
        global_counts = torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == 2
        if not self._all_ranks_finite(loss):
            self._record_nonfinite()
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                # DeepSpeed steps INSIDE backward at the accumulation boundary: skipping backward would desync its
                # micro-step count and leak this window's gradients into the next. Hand it the loss instead: the
                # non-finite gradients make its overflow check skip the whole step, in every precision
                # (`_make_deepspeed_skip_nonfinite_steps` turns that check on).
                self.accelerator.backward(loss, scale_wrt_gas=False)
            elif self.accelerator.scaler is not None:
                # fp16 AMP: the GradScaler must see this window's overflow (with no gradients at all its update()
                # asserts); the inf gradients make it skip the step and back off the scale.
                self.accelerator.backward(loss)
            return torch.zeros((), device=loss.device)
        self.nonfinite_in_a_row = 0
        self._train_metrics.add_train(outputs, weights)
        for name, value in weights.items():  # the weights these losses were computed with, for the log
            self._weight_sums[name] = self._weight_sums.get(name, 0.0) + float(value)
        self._weight_count += 1
        self._tokens_since_log += float(inputs["attention_mask"].sum())
        if not global_counts:
            loss = loss / self.current_gradient_accumulation_steps
        else:  # CE/KD already divided by global counts; undo the ranks' gradient averaging
            loss = outputs["cekd_loss"] * _data_parallel_world_size() + outputs["aux_loss"] / (
                self.current_gradient_accumulation_steps)
        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False  # already divided above
        self.accelerator.backward(loss, **kwargs)
        return loss.detach()

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step, and their [label tokens, KD rows] summed over the micro-batches
        and over the data-parallel ranks (read from torch.distributed: some launchers leave the Accelerator's count
        at 1). None for batches without labels."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, None
        counts = torch.zeros(2, dtype=torch.float64)
        for batch in batch_samples:
            counts[0] += float((batch["labels"] != IGNORE_INDEX).sum())
            if "kd_mask" in batch:
                counts[1] += float((batch["kd_mask"].bool() & (batch["topk_ids"] >= 0).any(-1)).sum())
        counts = counts.to(device)
        if _data_parallel_world_size() > 1:
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        return batch_samples, counts.float()

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must agree, or a rank that skips backward would deadlock the others' gradient all-reduce.
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _record_nonfinite(self) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        # The optimizer step is skipped: `SkipNonFiniteCallback` drops every gradient before it.
        self.skip_this_step = True
        limit = self.loss_args.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.state.global_step} "
                f"({self.nonfinite_total} in total); lower --learning_rate, use --bf16 instead of --fp16, or check "
                f"the data (raise --max_nonfinite_steps to tolerate more)"
            )

    # -- logging ------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._training_log_extras())
        super().log(logs, start_time)

    def _training_log_extras(self) -> dict[str, float]:
        extras = self._train_metrics.summary(self.accelerator)
        self._train_metrics.reset()
        now = time.perf_counter()
        tokens = float(self.accelerator.reduce(torch.tensor(self._tokens_since_log, device=self.args.device), "sum"))
        if self._last_log_time is not None and now > self._last_log_time:
            extras["tokens_per_second"] = tokens / (now - self._last_log_time)
        self._last_log_time = now
        self._tokens_since_log = 0.0
        extras["loss_scale"] = self._loss_scale()
        extras["nonfinite_skipped"] = float(self.nonfinite_total)
        # Mean weight over the micro-steps since the last log (the losses on the same line used exactly these).
        for c in COMPONENTS:
            if c.name in self._weight_sums:
                extras[c.tag("weight")] = self._weight_sums[c.name] / max(self._weight_count, 1)
        self._weight_sums, self._weight_count = {}, 0
        extras.update(self._xtok_log())
        return extras

    def _add_xtok_stats(self, stats: torch.Tensor | None) -> None:
        if stats is not None:
            stats = stats.reshape(-1).double()
            self._xtok_sums = stats if self._xtok_sums is None else self._xtok_sums + stats

    def _xtok_log(self) -> dict[str, float]:
        """Cross-tokenizer coverage since the last log, over all ranks: fraction of student positions with a KD
        target, and fraction of the teacher's top-k mass that landed on student ids."""
        if self._xtok_sums is None:
            return {}
        sums = self.accelerator.reduce(self._xtok_sums.to(self.args.device), "sum").tolist()
        self._xtok_sums = None
        tokens, aligned, teacher_mass, mapped_mass = sums
        return {"xtok/aligned_fraction": aligned / max(tokens, 1.0),
                "xtok/mapped_mass_fraction": mapped_mass / teacher_mass if teacher_mass else 0.0}

    def _loss_scale(self) -> float:
        """Current fp16 dynamic loss scale (1.0 when no loss scaling is in use)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        engine = getattr(self, "deepspeed", None)
        optimizer = getattr(engine, "optimizer", None)
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(optimizer, attr, None)
            if isinstance(value, (int, float, torch.Tensor)):
                return float(value)
        return 1.0

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
        """One eval batch: the model itself disables autocast in eval mode; we keep token-weighted sums. The samples
        accelerate repeats to give every rank an even last batch are masked out (no tokens counted)."""
        inputs = self._prepare_inputs(inputs)
        inputs.pop(XTOK_STATS, None)
        _mask_padding_samples(inputs, self._padding_samples(int(inputs["input_ids"].shape[0])))
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        self._eval_metrics.add_eval(outputs)
        return loss.detach(), None, None

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
        for key, value in self._eval_metrics.eval_summary(self.accelerator, self.eval_loss_weights()).items():
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
    if "kd_mask" in inputs:
        inputs["kd_mask"] = inputs["kd_mask"].masked_fill(padding[:, None], False)


def _make_deepspeed_skip_nonfinite_steps(ds_config: dict) -> None:
    """A non-finite loss reaches DeepSpeed as non-finite gradients (see `training_step`); make sure its overflow
    check then skips the step in every precision: fp16 always checks, ZeRO-3 and fp32 ZeRO-1/2 treat a non-finite
    gradient norm as an overflow, bf16 does when `bf16.check_grad_overflow` is on (forced here) and ZeRO-1/2 only
    while `compute_grad_norm` is on (forced here)."""
    bf16 = ds_config.get("bf16")
    if isinstance(bf16, dict):
        bf16["check_grad_overflow"] = True
    zero = ds_config.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
        zero["compute_grad_norm"] = True


__all__ = ["DistillTrainer", "NonFiniteLossError"]
