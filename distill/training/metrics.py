"""Running metrics for training logs and evaluation, reduced across ranks at log time, plus the scheduled weights."""

from __future__ import annotations

import math
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

    def add_eval(self, outputs: dict[str, torch.Tensor]) -> None:
        """Token-weighted sums, so batch boundaries do not change the result."""
        n_ce, n_kd = outputs["n_ce"].float(), outputs["n_kd"].float()
        self._add("n_ce", n_ce)
        self._add("n_kd", n_kd)
        self._add("ce_sum", outputs["ce"].float() * n_ce)
        self._add("kd_sum", outputs["kd"].float() * n_kd)
        self._add("top1_sum", outputs["top1_agree"].float() * n_kd)
        self._add("covered_sum", outputs["covered_mass"].float() * n_kd)

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
            denom = counts[DENOMINATOR.get(key, "count")]
            if denom:  # not computed in this window (zero weight, no targets): leave the key out, never a fake 0
                out[key] = value / denom
        return out

    def eval_summary(self, accelerator: Any, weights: dict[str, float]) -> dict[str, float]:
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
            out["loss"] = out.get("loss", 0.0) + weights["kd"] * out["kd"]
        return out
