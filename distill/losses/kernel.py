"""The fused, chunked CE + sparse-KD kernel behind `distill.losses.fused_ce_kd_loss` (pure PyTorch, no Triton).

The forward walks the rows in chunks: for each chunk it builds the fp32 logits [C, V], computes CE and KD and, right
there, the gradient of the loss with respect to those logits, which it folds into grad_hidden [N, H] and grad_weight
[V, H] (both fp32). Only those two are kept for backward, where they are scaled by grad_output. Peak extra memory is
O(C x V + V x H), never [N, V].

Several teachers (one `TeacherRows` each, their own support, tail and K): the chunk's logits are computed ONCE and
each teacher's KD gradient is added into the same [C, V] gradient buffer, so the three matmuls per chunk (logits,
grad_hidden, grad_weight) do not grow with the number of teachers; each teacher after the first needs one more [C, V]
buffer (a copy of the chunk's logits), never anything [N, V].

Shapes: N rows, H hidden, V vocabulary (LM-head rows), K teacher slots, C chunk rows, B = K + 1 buckets.
Sampled targets at T != 1 need one more [C, V] buffer per chunk (the tail's softmax at T, see `tail_temperature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.buckets import bucket_kd_and_grad, kd_slots, tail_temperature, teacher_top1
from distill.losses.config import IGNORE_INDEX, KDConfig


@dataclass(frozen=True)
class TeacherRows:
    """One teacher's targets as the kernel takes them: topk_ids [N, K] int64 (-1 = empty slot), topk_logprobs [N, K],
    tail_logprob [N], kd_row [N] bool (`buckets.kd_slots`), kd_scale: scalar tensor (its weight / denominator),
    config: its KD settings (teachers of different target kinds temper differently); None = the call's config."""

    topk_ids: Tensor
    topk_logprobs: Tensor
    tail_logprob: Tensor
    kd_row: Tensor
    kd_scale: Tensor
    config: KDConfig | None = None


STATS_PER_TEACHER = 3  # kd_sum, top1_agree_count, covered_mass_sum


class FusedCEKD(torch.autograd.Function):
    """loss = ce_scale * sum(CE rows) + sum over teachers of kd_scale * sum(KD rows); returns (loss, stats) where
    stats [1 + 3 x teachers] holds ce_sum, then (kd_sum, top1_agree_count, covered_mass_sum) per teacher, detached."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ce_scale: Tensor, teachers: tuple[TeacherRows, ...],
        config: KDConfig,
    ) -> tuple[Tensor, Tensor]:
        """hidden [N, H], weight [V, H], labels [N] int64, ce_scale scalar (weight / denominator), `teachers`: at
        least one. `config` gives the chunk size and the KD settings of teachers without their own."""
        device = hidden.device
        # One fp32 copy of the head for the whole call (a no-op for fp32 weights): fp16 logits would keep ~3 digits.
        weight32 = weight.float()
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_grad_hidden else None
        grad_weight = torch.zeros_like(weight32) if need_grad_weight else None
        stats = torch.zeros(1 + STATS_PER_TEACHER * len(teachers), dtype=torch.float32, device=device)

        has_label = labels != IGNORE_INDEX
        slot_valid = [kd_slots(t.topk_ids, t.kd_row)[1] for t in teachers]
        any_kd = teachers[0].kd_row
        for t in teachers[1:]:
            any_kd = any_kd | t.kd_row
        # Rows with neither a label nor KD (padding) cost nothing.
        active = (has_label | any_kd).nonzero().squeeze(1)
        no_ce = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, active.numel(), config.chunk_size):
            rows = active[start : start + config.chunk_size]
            hidden32 = hidden[rows].float()
            logits = hidden32 @ weight32.t()  # [C, V]; becomes the gradient buffer in place below
            # Each later teacher starts from the same logits; the last one may consume the copy in place.
            pristine = logits.clone() if len(teachers) > 1 else None
            grad_logits, chunk_stats = _teacher_pass(logits, rows, labels, has_label, teachers[0], slot_valid[0],
                                                     ce_scale, config)
            for i in range(1, len(teachers)):
                buffer = pristine if i == len(teachers) - 1 else pristine.clone()
                grad_i, stats_i = _teacher_pass(buffer, rows, labels, has_label, teachers[i], slot_valid[i], no_ce,
                                                config)
                grad_logits.add_(grad_i)
                chunk_stats += stats_i[1:]
                del grad_i, buffer  # the same storage: freed before the next chunk allocates its logits
            del pristine

            if grad_hidden is not None:
                grad_hidden.index_copy_(0, rows, grad_logits @ weight32)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden32)
            stats += torch.stack(chunk_stats)
            del logits, grad_logits

        loss = ce_scale * stats[0]
        for i, t in enumerate(teachers):
            loss = loss + t.kd_scale * stats[1 + STATS_PER_TEACHER * i]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.input_dtypes
        # Scale in fp32 before casting, so an fp16 loss scale lifts tiny gradients out of fp16 underflow. In place:
        # a second [V, H] fp32 copy would double the kernel's largest buffer (so backward runs once per forward).
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _teacher_pass(logits: Tensor, rows: Tensor, labels: Tensor, has_label: Tensor, teacher: TeacherRows,
                  slot_valid: Tensor, ce_scale: Tensor, config: KDConfig) -> tuple[Tensor, list[Tensor]]:
    """CE (scaled by `ce_scale`; 0 for every teacher after the first) + this teacher's KD on one chunk. Consumes
    `logits` [C, V] and returns it as the gradient of that loss w.r.t. the logits, with
    [ce_sum, kd_sum, top1_agree_count, covered_mass_sum] of the chunk."""
    topk_ids, topk_logprobs, tail_logprob, kd_row = teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob, \
        teacher.kd_row
    kd_scale = teacher.kd_scale
    config = teacher.config or config
    ids, valid = topk_ids[rows], slot_valid[rows]
    ids0 = ids.clamp(min=0)  # empty slots point at column 0 and add exactly 0 there
    row_has_label, row_kd = has_label[rows], kd_row[rows]
    label0 = labels[rows].clamp(min=0)[:, None]

    support_logits = logits.gather(1, ids0)  # [C, K]
    label_logits = logits.gather(1, label0).squeeze(1)
    # Knock the support out (-inf) so the tail's logsumexp comes straight from the logits: stable, never
    # 1 - sum(probabilities). One max pass and one exp pass over [C, V] serve CE, KD, argmax and gradient.
    logits.scatter_add_(1, ids0, torch.where(valid, -math.inf, 0.0))
    tail_max, tail_argmax = logits.max(dim=1)  # -inf iff the support covers the whole vocabulary
    tail_shift = torch.where(torch.isfinite(tail_max), tail_max, 0.0)
    grad_logits = logits.sub_(tail_shift[:, None]).exp_()  # exp(z - max) off the support, 0 on it
    tail_sum = grad_logits.sum(dim=1)  # >= 1 whenever a tail exists
    lse_tail = tail_shift + torch.log(tail_sum)
    tail_exists = tail_sum > 0
    support_masked = support_logits.masked_fill(~valid, -math.inf)
    lse_support = torch.logsumexp(support_masked, dim=1)  # -inf for rows without KD
    lse_all = torch.logaddexp(lse_tail, lse_support)
    support_max, support_best = support_masked.max(dim=1)
    support_argmax = ids0.gather(1, support_best[:, None]).squeeze(1)
    student_argmax = torch.where(support_max > tail_max, support_argmax, tail_argmax)
    ce_rows = torch.where(row_has_label, lse_all - label_logits, 0.0)
    tail_mass = torch.exp(lse_tail - lse_all)

    # KD's tail bucket: its logit and how its gradient spreads over the tail tokens (softmax at t_tail).
    t_tail = tail_temperature(config)
    kd_share = grad_logits if t_tail == 1 else grad_logits.pow(1 / t_tail)  # exp((z - max) / t_tail)
    kd_share_sum = tail_sum if t_tail == 1 else kd_share.sum(dim=1)
    kd_tail_logit = lse_tail if t_tail == 1 else tail_shift + t_tail * torch.log(kd_share_sum)

    teacher = torch.cat([topk_logprobs[rows].float(), tail_logprob[rows].float()[:, None]], dim=1)
    bucket_valid = torch.cat([valid, (row_kd & tail_exists & config.use_tail)[:, None]], dim=1)
    student = torch.cat([support_logits, kd_tail_logit[:, None]], dim=1)
    kd_rows, grad_buckets = bucket_kd_and_grad(student, teacher, bucket_valid, config)
    kd_rows = kd_rows * row_kd
    grad_buckets = grad_buckets * (row_kd[:, None] * kd_scale)

    # d loss / d logits = ce_s * (softmax - onehot) + kd grads on the support + tail grad * kd share.
    # softmax = tail_mass * softmax_tail on the tail, exp(z_S - lse_all) on the support.
    row_ce_scale = row_has_label * ce_scale
    ce_coef = row_ce_scale * tail_mass / torch.where(tail_exists, tail_sum, 1.0)
    kd_coef = grad_buckets[:, -1] / torch.where(tail_exists, kd_share_sum, 1.0)
    if t_tail == 1:
        grad_logits.mul_((ce_coef + kd_coef)[:, None])
    else:
        grad_logits.mul_(ce_coef[:, None]).add_(kd_share.mul_(kd_coef[:, None]))
    del kd_share
    support_prob = torch.exp(support_logits - lse_all[:, None])
    support_grad = row_ce_scale[:, None] * support_prob + grad_buckets[:, :-1]
    grad_logits.scatter_add_(1, ids0, torch.where(valid, support_grad, 0.0))
    grad_logits.scatter_add_(1, label0, -row_ce_scale[:, None])

    covered = torch.exp(lse_support - lse_all)
    top1 = student_argmax == teacher_top1(ids, topk_logprobs[rows], valid)
    return grad_logits, [ce_rows.sum(), kd_rows.sum(), (top1 & row_kd).sum(), torch.where(row_kd, covered, 0.0).sum()]
