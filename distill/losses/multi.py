"""Several teachers at once: CE + the weighted sum of each teacher's KD, in one pass of the fused kernel.

Each teacher's KD term is exactly the single-teacher KD (`distill.losses.core`) over ITS OWN support and tail bucket,
divided by its own KD-row count; the total is sum_t w_t KD_t (weights as given; the trainer normalises them to sum
1, so `kd_weight` keeps its meaning). The kernel computes the student's logits once per chunk for all teachers.

Forward KL: for weights summing to 1, sum_t w_t KL(p_t || q) = sum_t w_t sum_v p_t log p_t - sum_v (sum_t w_t p_t)
log q = KL(p_mix || q) + [sum_t w_t (-H(p_t)) + H(p_mix)], with p_mix = sum_t w_t p_t. The bracket does not depend on
the student, so the weighted sum IS distillation from the mixture of the teachers' (tempered) distributions: same
gradient, loss shifted by a constant (a generalised Jensen-Shannon divergence between the teachers, >= 0). Exactly so
when every teacher's buckets are full-vocabulary tokens (support covering the vocabulary, or sampled targets, whose
tail is empty); with a top-k tail each teacher's tail bucket spreads its mass over the tail tokens in proportion to
the student's own tail, teacher by teacher.

Reverse KL, JSD, skew KL: the weighted sum is NOT KD to the mixture (KL(q || p_mix) != sum_t w_t KL(q || p_t): the
student is pulled towards each teacher's modes separately instead of the mixture's); it is computed as the weighted
sum of the per-teacher divergences, a well-defined but different objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill.losses.config import KDConfig
from distill.losses.core import CEKDOutput, cekd_output, loss_scale, prepare
from distill.losses.kernel import STATS_PER_TEACHER, FusedCEKD, TeacherRows

__all__ = ["MultiCEKDOutput", "TeacherTargets", "fused_multi_ce_kd_loss"]


@dataclass
class TeacherTargets:
    """One teacher's sparse targets, shapes as in `fused_ce_kd_loss`: topk_ids [N, K], topk_logprobs [N, K],
    tail_logprob [N], kd_mask [N] bool (K may differ between teachers). `config`: this teacher's KD settings when
    they differ from the call's (a sampled cache beside a top-k one: `KDConfig.for_targets`); None = the call's."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    kd_mask: torch.Tensor
    config: KDConfig | None = None


@dataclass
class MultiCEKDOutput:
    loss: torch.Tensor  # differentiable: ce_scale * ce_sum + sum_t kd_weight * w_t * kd_sum_t / kd_den_t
    ce: torch.Tensor  # detached mean CE over rows with a label
    n_ce: int
    kd: torch.Tensor  # detached sum_t w_t * (mean KD of teacher t): the mixture KD (forward KL: up to a constant)
    teachers: list[CEKDOutput]  # per teacher: its kd, n_kd, top1_agree, covered_mass, kd_sum (ce fields shared)


def fused_multi_ce_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teachers: Sequence[TeacherTargets],
    *,
    teacher_weights: Sequence[float] | None = None,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    config: KDConfig | None = None,
    ce_denominator: float | torch.Tensor | None = None,
    kd_denominators: Sequence[float | torch.Tensor | None] | None = None,
) -> MultiCEKDOutput:
    """CE on `labels` + kd_weight x sum_t teacher_weights[t] x KD_t, fused and chunked (never [N, V], see the
    kernel). `teacher_weights` default: equal, summing to 1. `kd_denominators[t]` divides teacher t's summed KD
    (default: its own KD-row count). One teacher with weight 1 is `fused_ce_kd_loss`, bit for bit."""
    if not teachers:
        raise ValueError("teachers is empty; pass at least one TeacherTargets")
    weights = list(teacher_weights) if teacher_weights is not None else [1.0 / len(teachers)] * len(teachers)
    dens = list(kd_denominators) if kd_denominators is not None else [None] * len(teachers)
    if len(weights) != len(teachers) or len(dens) != len(teachers):
        raise ValueError(f"{len(teachers)} teachers but {len(weights)} weights and {len(dens)} denominators; give one "
                         "per teacher")
    prepared = [prepare(hidden, weight, labels, t.topk_ids, t.topk_logprobs, t.tail_logprob, t.kd_mask,
                        t.config or config) for t in teachers]
    first = prepared[0]
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()  # evaluation: no gradient buffers (see fused_ce_kd_loss)
    rows = tuple(
        TeacherRows(x.topk_ids, t.topk_logprobs, t.tail_logprob, x.kd_row,
                    loss_scale(kd_weight * w, den, x.n_kd, hidden.device), x.config)
        for x, t, w, den in zip(prepared, teachers, weights, dens, strict=True)
    )
    with torch.autocast(hidden.device.type, enabled=False):
        loss, stats = FusedCEKD.apply(hidden, weight, first.labels,
                                      loss_scale(ce_weight, ce_denominator, first.n_ce, hidden.device), rows,
                                      first.config)
    stats = stats.detach()
    per_teacher = []
    for i, x in enumerate(prepared):
        part = stats[1 + STATS_PER_TEACHER * i : 1 + STATS_PER_TEACHER * (i + 1)]
        per_teacher.append(cekd_output(loss, torch.cat([stats[:1], part]), first.n_ce, x.n_kd))
    kd = sum((w * out.kd for w, out in zip(weights, per_teacher, strict=True)), stats.new_zeros(()))
    return MultiCEKDOutput(loss=loss, ce=per_teacher[0].ce, n_ce=first.n_ce, kd=kd, teachers=per_teacher)
