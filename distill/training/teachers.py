"""Several teachers (several --cache): their weights, their KD settings and the model's multi-teacher loss call.

Teacher 0 is the first --cache; the batch carries teacher t >= 1's targets under `distill.data.dataset.teacher_key`
(`t{t}.topk_ids`, ..., and the trainer's `t{t}.kd_denominator`). The KD term is sum_t w_t KD_t with the weights
normalised to sum 1, so --kd_weight keeps its meaning (`distill.losses.multi` says what that objective is per
divergence). One teacher never comes here: its run is the single-teacher call, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cache_tools.format.errors import ConfigError
from distill.data.dataset import TEACHER_KEYS, teacher_key
from distill.losses import KDConfig, TeacherTargets, fused_multi_ce_kd_loss

PER_TEACHER_METRICS = ("kd", "top1_agreement", "teacher_mass_covered")


def teacher_tag(index: int, metric: str) -> str:
    """TensorBoard tag of one teacher's metric: `teacher{index}/{metric}` (next to the totals)."""
    return f"teacher{index}/{metric}"


def parse_teacher_weights(spec: str | Sequence[float] | None, count: int, flag: str = "--teacher_weights"
                          ) -> list[float]:
    """`spec` ("0.6,0.4", a YAML list, or None = equal) -> `count` weights summing to 1. ConfigError (one line) when
    the count differs, a weight is negative or not finite, or they sum to 0."""
    if spec is None or spec == "" or (not isinstance(spec, str) and len(spec) == 0):
        return [1.0 / count] * count if count > 1 else [1.0]
    try:
        values = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{flag} {spec!r}: give comma-separated numbers, one per --cache") from err
    if len(values) != count:
        raise ConfigError(f"{flag} lists {len(values)} weight(s) for {count} --cache; give one weight per cache")
    if not all(math.isfinite(v) and v >= 0 for v in values) or not sum(values) > 0:
        raise ConfigError(f"{flag} {spec!r}: weights must be finite, >= 0 and sum to more than 0")
    total = sum(values)
    return [v / total for v in values]


def teacher_fields(fields: dict[str, Any], index: int) -> dict[str, Any]:
    """Teacher `index`'s targets from the model's extra keyword arguments, under their single-teacher names."""
    return {key: fields.get(teacher_key(index, key)) for key in (*TEACHER_KEYS, "kd_denominator")}


def multi_teacher_cekd(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor,
                       teachers: Sequence[dict[str, Any]], *, weights: dict[str, float],
                       teacher_weights: Sequence[float], kd_configs: Sequence[KDConfig],
                       ce_denominator: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The fused CE + weighted multi-teacher KD on flattened rows; returns the model's CE/KD outputs (mixture KD as
    "kd", totals of top-1 agreement and covered mass as weighted means) plus each teacher's under `teacher_tag`."""
    targets = []
    for t, config in zip(teachers, kd_configs, strict=True):
        K = t["topk_ids"].shape[-1]
        targets.append(TeacherTargets(t["topk_ids"].reshape(-1, K), t["topk_logprobs"].reshape(-1, K).float(),
                                      t["tail_logprob"].reshape(-1).float(), t["kd_mask"].reshape(-1), config))
    out = fused_multi_ce_kd_loss(
        hidden, head, labels, targets, teacher_weights=teacher_weights, ce_weight=float(weights["ce"]),
        kd_weight=float(weights["kd"]), config=kd_configs[0], ce_denominator=ce_denominator,
        kd_denominators=[t.get("kd_denominator") for t in teachers])
    device = out.loss.device
    result = {"cekd_loss": out.loss, "ce": out.ce, "kd": out.kd,
              "n_ce": torch.tensor(out.n_ce, device=device),
              "n_kd": torch.tensor(max(t.n_kd for t in out.teachers), device=device),
              "top1_agree": sum(w * t.top1_agree for w, t in zip(teacher_weights, out.teachers, strict=True)),
              "covered_mass": sum(w * t.covered_mass for w, t in zip(teacher_weights, out.teachers, strict=True))}
    for i, t in enumerate(out.teachers):
        result[teacher_tag(i, "kd")] = t.kd
        result[teacher_tag(i, "top1_agreement")] = t.top1_agree
        result[teacher_tag(i, "teacher_mass_covered")] = t.covered_mass
        result[teacher_tag(i, "n_kd")] = torch.tensor(t.n_kd, device=device)
    return result
