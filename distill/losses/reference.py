"""The plain reference for `distill.losses.fused_ce_kd_loss`: full [N, V] fp32 logits and autograd.

Shapes: N rows, H hidden, V vocabulary, K teacher slots. Same buckets, KD-row rule and divergence values as the fused
kernel (`distill.losses.buckets`, `distill.losses.divergences`), but the gradient comes from autograd through the
divergence's `value`, so tests that compare the two check the registry's analytic gradients too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.buckets import bucket_kd, tail_temperature, teacher_top1
from distill.losses.config import IGNORE_INDEX, KDConfig
from distill.losses.core import CEKDOutput, cekd_output, loss_scale, prepare


def naive_ce_kd_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor,
    kd_mask: Tensor, *, ce_weight: float = 1.0, kd_weight: float = 1.0, config: KDConfig | None = None,
    ce_denominator: float | Tensor | None = None, kd_denominator: float | Tensor | None = None,
) -> CEKDOutput:
    """The same loss as `fused_ce_kd_loss` (same arguments and shapes) with full [N, V] fp32 logits and plain
    autograd: the reference for tests and the benchmark's baseline. Memory O(N x V)."""
    x = prepare(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask, config)
    config, labels, topk_ids, kd_row, slot_valid = x.config, x.labels, x.topk_ids, x.kd_row, x.slot_valid
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().t()  # [N, V] fp32 even under AMP
    vocab = logits.shape[1]
    ids0 = topk_ids.clamp(min=0)
    ce_sum = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    lse_all = torch.logsumexp(logits, dim=1)
    on_support = torch.zeros_like(logits).scatter_add_(1, ids0, slot_valid.float()) > 0
    # A finite fill, not -inf: rows whose support covers the vocabulary would otherwise backpropagate NaN.
    t_tail = tail_temperature(config)
    lse_tail = t_tail * torch.logsumexp(logits.masked_fill(on_support, -1.0e30) / t_tail, dim=1)
    tail_exists = on_support.sum(1) < vocab
    student = torch.cat([logits.gather(1, ids0), torch.where(tail_exists, lse_tail, 0.0)[:, None]], dim=1)
    teacher = torch.cat([topk_logprobs.float(), tail_logprob.float()[:, None]], dim=1)
    valid = torch.cat([slot_valid, (kd_row & tail_exists & config.use_tail)[:, None]], dim=1)
    kd_rows = bucket_kd(student, teacher, valid, config)
    kd_sum = torch.where(kd_row, kd_rows, 0.0).sum()
    loss = loss_scale(ce_weight, ce_denominator, x.n_ce, hidden.device) * ce_sum
    loss = loss + loss_scale(kd_weight, kd_denominator, x.n_kd, hidden.device) * kd_sum
    with torch.no_grad():
        covered = torch.exp(torch.logsumexp(logits.gather(1, ids0).masked_fill(~slot_valid, -math.inf), 1) - lse_all)
        top1 = (logits.argmax(1) == teacher_top1(topk_ids, topk_logprobs, slot_valid)) & kd_row
        stats = torch.stack([ce_sum, kd_sum, top1.sum(), torch.where(kd_row, covered, 0.0).sum()])
    return cekd_output(loss, stats, x.n_ce, x.n_kd)
