"""Running metrics for training logs and evaluation, reduced across ranks at log time, plus the scheduled weights."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import torch

from distill.training.components import COMPONENTS

KD_METRICS = ("top1_agreement", "teacher_mass_covered")  # KD diagnostics, averaged over KD micro-batches
# Denominator of each running mean: its micro-batch count key ("count" = every micro-batch).
COUNT_KEY = {"all": "count", "kd": "kd_count", "aux": "aux_count"}
DENOMINATOR = {**{key: "kd_count" for key in KD_METRICS},
               **{tag: COUNT_KEY[c.count] for c in COMPONENTS for tag in (c.tag("loss"), c.tag("weighted"))}}


def scheduled_weights(loss_args: Any, *, step: int, total_steps: int) -> dict[str, float]:
    """{component: base x ramp(step / total_steps)} for every registered component (see `distill.losses.schedules`)."""
    from distill.losses.schedules import parse_weight

    return {
        c.name: float(parse_weight(getattr(loss_args, c.weight_field), getattr(loss_args, c.schedule_field))(
            step, max(total_steps, 1)))
        for c in COMPONENTS
    }


class MetricAccumulator:
    """Sums of per-micro-batch values on the device (no host sync per step); `summary()` reduces across ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.sums = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def add_train(self, outputs: dict[str, torch.Tensor], weights: dict[str, float]) -> None:
        """Micro-batch means, averaged over micro-batches at log time (like Trainer's own `loss`)."""
        # The same keys on every call and every rank (the cross-rank reduce stacks them in one tensor); KD values of
        # micro-batches without KD (zero weight, no targets) are masked out and averaged over KD micro-batches only.
        masks = {"all": outputs["loss"].new_ones(()).float(), "kd": (outputs["n_kd"] > 0).float(),
                 "aux": (outputs["n_aux"] > 0).float()}
        for group, key in COUNT_KEY.items():
            self._add(key, masks[group])
        self._add("total", outputs["loss"])
        for c in COMPONENTS:
            mask = masks[c.count]
            self._add(c.tag("loss"), outputs[c.name] * mask)
            self._add(c.tag("weighted"), outputs[c.name] * weights[c.name] * mask)
        self._add("top1_agreement", outputs["top1_agree"] * masks["kd"])
        self._add("teacher_mass_covered", outputs["covered_mass"] * masks["kd"])
        for key in _teacher_keys(outputs):  # several teachers: each one's KD diagnostics beside the totals
            if not key.endswith("/n_kd"):
                self._add(key, outputs[key] * masks["kd"])

    def add_eval(self, outputs: dict[str, torch.Tensor]) -> None:
        """Token-weighted sums, so batch boundaries do not change the result."""
        n_ce, n_kd = outputs["n_ce"].float(), outputs["n_kd"].float()
        self._add("n_ce", n_ce)
        self._add("n_kd", n_kd)
        self._add("ce_sum", outputs["ce"].float() * n_ce)
        self._add("kd_sum", outputs["kd"].float() * n_kd)
        self._add("top1_sum", outputs["top1_agree"].float() * n_kd)
        self._add("covered_sum", outputs["covered_mass"].float() * n_kd)
        for key in _teacher_keys(outputs):
            if key.endswith("/n_kd"):
                self._add(key, outputs[key].float())
            else:  # teacher{i}/metric, weighted by that teacher's own KD rows
                self._add(key, outputs[key].float() * outputs[key.rsplit("/", 1)[0] + "/n_kd"].float())

    def _reduced(self, accelerator: Any) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = torch.stack([self.sums[k].reshape(()) for k in keys])
        stacked = accelerator.reduce(stacked, "sum")
        return dict(zip(keys, stacked.tolist(), strict=True))

    def summary(self, accelerator: Any) -> dict[str, float]:
        sums = self._reduced(accelerator)
        counts = {key: sums.pop(key, 0.0) for key in COUNT_KEY.values()}
        out = {}
        for key, value in sums.items():
            denom = counts[DENOMINATOR.get(key, "kd_count" if TEACHER_TAG.match(key) else "count")]
            if denom:  # not computed in this window (zero weight, no targets): leave the key out, never a fake 0
                out[key] = value / denom
        return out

    def eval_summary(self, accelerator: Any, weights: dict[str, float],
                     teacher_weights: list[float] | None = None) -> dict[str, float]:
        """Token-weighted means. Several teachers: each one's metrics over its own KD rows (`teacher{i}/...`), and
        "kd" = the mixture KD sum_i w_i kd_i (`teacher_weights`, as the model uses them)."""
        sums = self._reduced(accelerator)
        n_ce, n_kd = sums.get("n_ce", 0.0), sums.get("n_kd", 0.0)
        out: dict[str, float] = {}
        if n_ce:
            ce = sums["ce_sum"] / n_ce
            out["ce"] = ce
            out["perplexity"] = math.exp(min(ce, 80.0))  # exp(80) ~ 5e34: a clear "diverged" without inf
            out["loss"] = weights["ce"] * ce
        if n_kd:
            out["kd"] = sums["kd_sum"] / n_kd
            out["top1_agreement"] = sums["top1_sum"] / n_kd
            out["teacher_mass_covered"] = sums["covered_sum"] / n_kd
        per_teacher = {}
        for key, value in sums.items():
            match = TEACHER_TAG.match(key)
            if match and not key.endswith("/n_kd") and sums.get(f"teacher{match[1]}/n_kd"):
                per_teacher[key] = value / sums[f"teacher{match[1]}/n_kd"]
        out.update(per_teacher)
        if per_teacher and teacher_weights:
            out["kd"] = sum(w * per_teacher.get(f"teacher{i}/kd", 0.0) for i, w in enumerate(teacher_weights))
        if n_kd:
            out["loss"] = out.get("loss", 0.0) + weights["kd"] * out["kd"]
        return out


TEACHER_TAG = re.compile(r"^teacher(\d+)/(.+)$")  # `distill.training.teachers.teacher_tag`


def _teacher_keys(outputs: dict[str, Any]) -> list[str]:
    return sorted(key for key in outputs if TEACHER_TAG.match(key))


class TrainingLog:
    """What each training log line adds to Trainer's own keys: running means of every component (`MetricAccumulator`),
    tokens/s, the fp16 loss scale, skipped steps, the mean scheduled weights and the cross-tokenizer coverage, all
    since the previous log line and over every rank."""

    def __init__(self) -> None:
        self.metrics = MetricAccumulator()
        self._tokens = 0.0
        self._total_tokens = 0.0  # every rank's real tokens since the run (or its resume) started
        self._last_time: float | None = None
        self._xtok_sums: torch.Tensor | None = None  # [4] sums of XTOK_STAT_KEYS
        self._weight_sums: dict[str, float] = {}
        self._weight_count = 0

    def start(self) -> None:
        """Tokens/s of the first window counts from the first training step."""
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def add_step(self, outputs: dict[str, torch.Tensor], weights: dict[str, float], tokens: float) -> None:
        """One finite micro-batch: its losses, the weights they were computed with, its real tokens."""
        self.metrics.add_train(outputs, weights)
        for name, value in weights.items():
            self._weight_sums[name] = self._weight_sums.get(name, 0.0) + float(value)
        self._weight_count += 1
        self._tokens += tokens

    def add_xtok(self, stats: torch.Tensor | None) -> None:
        if stats is not None:
            stats = stats.reshape(-1).double()
            self._xtok_sums = stats if self._xtok_sums is None else self._xtok_sums + stats

    def extras(self, accelerator: Any, device: Any, *, loss_scale: float, nonfinite_total: int) -> dict[str, float]:
        """The keys to add to this log line; resets the window."""
        extras = self.metrics.summary(accelerator)
        self.metrics.reset()
        now = time.perf_counter()
        tokens = float(accelerator.reduce(torch.tensor(self._tokens, device=device), "sum"))
        if self._last_time is not None and now > self._last_time:
            extras["tokens_per_second"] = tokens / (now - self._last_time)
        self._last_time = now
        self._tokens = 0.0
        self._total_tokens += tokens
        extras["tokens_seen"] = self._total_tokens
        extras["loss_scale"] = loss_scale
        extras["nonfinite_skipped"] = float(nonfinite_total)
        # Mean weight over the micro-steps since the last log (the losses on the same line used exactly these).
        for c in COMPONENTS:
            if c.name in self._weight_sums:
                extras[c.tag("weight")] = self._weight_sums[c.name] / max(self._weight_count, 1)
        self._weight_sums, self._weight_count = {}, 0
        extras.update(self._xtok_log(accelerator, device))
        return extras

    def _xtok_log(self, accelerator: Any, device: Any) -> dict[str, float]:
        """Cross-tokenizer coverage over all ranks: fraction of student positions with a KD target, and fraction of
        the teacher's top-k mass that landed on student ids."""
        if self._xtok_sums is None:
            return {}
        sums = accelerator.reduce(self._xtok_sums.to(device), "sum").tolist()
        self._xtok_sums = None
        tokens, aligned, teacher_mass, mapped_mass = sums
        return {"xtok/aligned_fraction": aligned / max(tokens, 1.0),
                "xtok/mapped_mass_fraction": mapped_mass / teacher_mass if teacher_mass else 0.0}


def loss_scale(accelerator: Any, deepspeed_engine: Any) -> float:
    """Current fp16 dynamic loss scale (1.0 when no loss scaling is in use)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    optimizer = getattr(deepspeed_engine, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, attr, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return 1.0
