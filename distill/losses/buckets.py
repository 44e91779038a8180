"""KD over buckets: which rows and slots take part, the tempered bucket distributions, and the divergence per row.

Shapes: N rows, K teacher slots, R rows of a chunk, B = K + 1 buckets (the listed ids, then the tail).

Shared by the fused kernel (`distill.losses.kernel`) and the naive reference (`distill.losses.reference`), so the rules
below exist once:
- KD rows: `kd_mask` and at least one non-empty slot (`topk_ids >= 0`); empty slots are ignored everywhere.
- Temperature T: the student's bucket distribution is softmax(logits / T). The teacher's is softmax(log-mass / T) when
  the loss tempers it (`KDConfig.tempers_teacher`, top-k targets: a listed token is tempered exactly as in
  full-vocabulary KD, the tail bucket as ONE token), and the masses as given when it is already tempered (sampled
  targets: counts/N were drawn at the temperature the trainer checks equals T). KD x T^2.
- A teacher log-mass of -inf (the tail of sampled targets) is zero mass: it becomes BUCKET_FILL, so 0 * log 0 terms
  and their gradients are 0, never NaN.
"""

from __future__ import annotations

import math

import torch

from distill.losses.config import KDConfig
from distill.losses.divergences import DIVERGENCES

# Stand-in log-value for buckets that do not exist (empty slots, a missing tail) or have zero teacher mass:
# exp(FILL / T) is exactly 0 in fp32 for any sane T, while staying finite keeps 0 * log(0)-style terms and their
# gradients at 0 instead of NaN.
BUCKET_FILL = -1.0e9


def kd_slots(topk_ids: torch.Tensor, kd_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one KD-row rule: [N, K] ids, [N] bool mask -> (kd_row [N] bool, slot_valid [N, K] bool); a slot is valid
    when it is not empty and its row is a KD row."""
    slot_valid = (topk_ids >= 0) & kd_mask[:, None]
    return slot_valid.any(-1), slot_valid


def tail_temperature(config: KDConfig) -> float:
    """The temperature at which the student's tail bucket aggregates its tokens (its logit is
    t * logsumexp(tail logits / t), and its gradient spreads over them by softmax(tail logits / t)).

    Raw teacher log-probs (top-k, `config.tempers_teacher`): 1, i.e. the tail is tempered as ONE token on both sides
    (the teacher's tail is known only as a total), so KD is zero for identical distributions. An already tempered
    teacher (sampled draws): T, so the student's bucket distribution is exactly the full-vocabulary softmax(z / T)
    aggregated (a teacher tail, if any, is a mass at T too); forward KL's gradient is T * (softmax(z / T) - counts/N)
    on every token."""
    return 1.0 if config.tempers_teacher else config.temperature


def bucket_log_probs(
    student_logits: torch.Tensor, teacher_logmass: torch.Tensor, valid: torch.Tensor, config: KDConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, B] student logits (a token's logit; for the tail t * logsumexp(logits outside the support / t),
    t = `tail_temperature`; only differences matter), [R, B] teacher log-masses (renormalised here, which absorbs the
    fp16 rounding of the cache), [R, B] bool valid -> (log_p, log_q) [R, B] fp32 tempered distributions, invalid
    buckets at probability 0."""
    t = config.temperature
    student = torch.where(valid, student_logits, BUCKET_FILL) / t
    teacher = torch.where(valid, teacher_logmass.float().clamp(min=BUCKET_FILL), BUCKET_FILL)
    if config.tempers_teacher:
        teacher = teacher / t
    return torch.log_softmax(teacher, dim=-1), torch.log_softmax(student, dim=-1)


def bucket_kd(
    student_logits: torch.Tensor, teacher_logmass: torch.Tensor, valid: torch.Tensor, config: KDConfig
) -> torch.Tensor:
    """[R] KD per row (differentiable w.r.t. `student_logits`), T^2 x the divergence of `config.kind`; inputs as in
    `bucket_log_probs`. For T > 1 the tail bucket weighs less than tempering each tail token would
    (sum p^(1/T) >= (sum p)^(1/T)); KD is zero for identical distributions at every T and equals full-vocabulary
    tempered KD when the support covers the vocabulary."""
    log_p, log_q = bucket_log_probs(student_logits, teacher_logmass, valid, config)
    return DIVERGENCES[config.kind].value(log_p, log_q, config) * config.temperature**2


def bucket_kd_and_grad(
    student_logits: torch.Tensor, teacher_logmass: torch.Tensor, valid: torch.Tensor, config: KDConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """([R] KD per row, [R, B] its gradient w.r.t. `student_logits`), both detached: the registry's analytic gradient
    when the divergence has one, else autograd through `value`. d/dz = (1/T) d/ds and KD carries T^2, hence x T."""
    divergence = DIVERGENCES[config.kind]
    t = config.temperature
    if divergence.grad is None:
        student = student_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            rows = bucket_kd(student, teacher_logmass, valid, config)
            (grad,) = torch.autograd.grad(rows.sum(), student)
        return rows.detach(), grad
    with torch.no_grad():
        log_p, log_q = bucket_log_probs(student_logits, teacher_logmass, valid, config)
        rows = divergence.value(log_p, log_q, config) * t**2
        grad = torch.where(valid, divergence.grad(log_p, log_q, config) * t, 0.0)
    return rows, grad


def teacher_top1(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """[R] the teacher's most likely listed id (the best valid slot, so -1 padding anywhere is skipped)."""
    best = torch.where(slot_valid, topk_logprobs.float(), -math.inf).argmax(-1, keepdim=True)
    return topk_ids.gather(1, best).squeeze(1)
