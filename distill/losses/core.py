"""Distillation losses: CE on the labels plus KD on the teacher's sparse targets, from hidden states and the LM head.

Shapes: N = rows (tokens, flattened batch x positions), H = student hidden, V = student vocab (LM-head rows),
K = teacher slots.

KD is computed over K + 1 buckets: the teacher's listed ids (the support) and one tail bucket.
- Top-k targets (`KDConfig.targets="topk"`): `topk_logprobs` = the teacher's log-probs of its top-k ids,
  `tail_logprob` = log(1 - their sum), from the cache.
- Sampled targets (`targets="sampled"`, RS-KD): `topk_logprobs` = log(count / N) of the distinct ids among N draws
  from the teacher at the cache's sample temperature, `tail_logprob` = -inf (zero teacher mass outside the sample).
  Forward KL then has gradient T * (softmax(z / T) - counts/N) over the whole vocabulary, unbiased for full KD.
  Divergences not defined on a sample are refused (the registry, `distill.losses.divergences`, says which).
- Student tail: 1 - sum of the student's probabilities on the support, computed stably as
  logsumexp(logits outside the support) - logsumexp(all logits).
- `use_tail=False` drops the tail bucket: both distributions are renormalised over the support (ablation).
- Empty slots (`topk_ids == -1`: cross-tokenizer or sample padding) are ignored everywhere. If the support covers the
  whole vocabulary there is no tail bucket.
- Temperature, KD rows and the zero-mass rule: see `distill.losses.buckets`. CE rows: label != IGNORE_INDEX.

`fused_ce_kd_loss` never builds [N, V] logits (see `distill.losses.kernel`); `naive_ce_kd_loss`
(`distill.losses.reference`) is the same loss computed the plain way with full logits and autograd (the reference for
tests and the benchmark baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses.buckets import kd_slots
from distill.losses.config import IGNORE_INDEX, KDConfig
from distill.losses.kernel import FusedCEKD, TeacherRows

__all__ = ["CEKDOutput", "fused_ce_kd_loss", "prepare"]


@dataclass
class CEKDOutput:
    loss: torch.Tensor  # scalar, differentiable: ce_weight * ce_sum / ce_den + kd_weight * kd_sum / kd_den
    ce: torch.Tensor  # scalar, detached: mean CE over rows with a label (own count, whatever the denominator)
    kd: torch.Tensor  # scalar, detached: mean KD over KD rows (own count)
    n_ce: int  # rows with a label
    n_kd: int  # KD rows (kd_mask and at least one non-empty slot)
    top1_agree: torch.Tensor  # scalar, detached: fraction of kd rows where student argmax == teacher top-1
    covered_mass: torch.Tensor  # scalar, detached: mean student probability mass on the teacher's top-k ids
    ce_sum: torch.Tensor | None = None  # scalar, detached: summed CE (for exact averaging across ranks / steps)
    kd_sum: torch.Tensor | None = None  # scalar, detached: summed KD


def check_inputs(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask) -> None:
    """Raise ValueError (one line naming the argument and the fix) for inconsistent shapes, dtypes or ids."""
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.ndim != 2 or weight.shape[1] != h:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [V, {h}] to match hidden [N, {h}]")
    k = topk_ids.shape[-1]
    expected = {"labels": (n,), "topk_ids": (n, k), "topk_logprobs": (n, k), "tail_logprob": (n,), "kd_mask": (n,)}
    given = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprob=tail_logprob)
    given["kd_mask"] = kd_mask
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(given[name].shape)}; expected {shape} (N={n} rows, K={k})")
    if kd_mask.dtype != torch.bool:
        raise ValueError(f"kd_mask has dtype {kd_mask.dtype}; pass a bool tensor")
    if n and (int(topk_ids.max()) >= v or int(labels.max()) >= v):
        raise ValueError(f"topk_ids/labels hold ids >= V={v} (the LM-head rows); map teacher ids to student ids first")
    if n and bool(((labels < 0) & (labels != IGNORE_INDEX)).any()):
        raise ValueError(f"labels hold negative ids other than IGNORE_INDEX={IGNORE_INDEX}; mark missing ones with it")


@dataclass
class Prepared:
    """What both implementations start from, after the one validation and the one KD-row rule."""

    config: KDConfig
    labels: torch.Tensor  # [N] int64
    topk_ids: torch.Tensor  # [N, K] int64 (the cache may hold int32: gather/scatter want int64)
    kd_row: torch.Tensor  # [N] bool
    slot_valid: torch.Tensor  # [N, K] bool
    n_ce: int
    n_kd: int


def prepare(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask, config) -> Prepared:
    """Refuse a `config` whose construction found problems and check the inputs (ValueError, one line); shapes as in
    `fused_ce_kd_loss`."""
    config = (config or KDConfig()).validate()
    check_inputs(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask)
    labels, topk_ids = labels.long(), topk_ids.long()
    kd_row, slot_valid = kd_slots(topk_ids, kd_mask)
    n_ce = int((labels != IGNORE_INDEX).sum())
    return Prepared(config, labels, topk_ids, kd_row, slot_valid, n_ce, int(kd_row.sum()))


def loss_scale(weight: float, denominator, count: int, device: torch.device) -> torch.Tensor:
    den = torch.as_tensor(max(count, 1) if denominator is None else denominator, dtype=torch.float32, device=device)
    return torch.as_tensor(weight, dtype=torch.float32, device=device) / den


def cekd_output(loss, stats: torch.Tensor, n_ce: int, n_kd: int) -> CEKDOutput:
    stats = stats.detach()
    return CEKDOutput(
        loss=loss,
        ce=stats[0] / max(n_ce, 1),
        kd=stats[1] / max(n_kd, 1),
        n_ce=n_ce,
        n_kd=n_kd,
        top1_agree=stats[2] / max(n_kd, 1),
        covered_mass=stats[3] / max(n_kd, 1),
        ce_sum=stats[0],
        kd_sum=stats[1],
    )


def fused_ce_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    config: KDConfig | None = None,
    ce_denominator: float | torch.Tensor | None = None,
    kd_denominator: float | torch.Tensor | None = None,
) -> CEKDOutput:
    """CE on `labels` plus KD on the sparse teacher targets, from hidden states and the LM-head weight, chunked.

    Args:
        hidden: [N, H] student final hidden states (fp32, bf16 or fp16; logits are built in fp32).
        weight: [V, H] LM-head weight (the full weight: under ZeRO-3 the caller gathers it; tied embeddings are fine).
        labels: [N] int64 next-token ids, IGNORE_INDEX where there is none.
        topk_ids: [N, K] int64 teacher ids (student vocabulary), -1 = empty slot; no duplicate ids within a row.
        topk_logprobs: [N, K] teacher log-probs (normalised over the teacher vocabulary), or log(count / N).
        tail_logprob: [N] log of the teacher mass outside the listed ids (-inf: none, as for sampled targets).
        kd_mask: [N] bool, rows where KD applies.
        ce_denominator / kd_denominator: divide the summed CE / KD by these (e.g. global token counts across
            gradient accumulation and ranks) instead of this call's own counts (the default, None).
    Memory: O(chunk_size x V + V x H); gradients for hidden and weight are computed in the forward.
    """
    x = prepare(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask, config)
    if not torch.is_grad_enabled():
        # Evaluation: `needs_input_grad` follows requires_grad, not grad mode; detaching skips the gradient buffers
        # and the two extra matmuls per chunk that nobody would read.
        hidden, weight = hidden.detach(), weight.detach()
    # The kernel builds its logits in fp32 on purpose: under native AMP (fp16/bf16 autocast, e.g. the P100 recipe)
    # the matmul would otherwise come back in half precision.
    with torch.autocast(hidden.device.type, enabled=False):
        teacher = TeacherRows(x.topk_ids, topk_logprobs, tail_logprob, x.kd_row,
                              loss_scale(kd_weight, kd_denominator, x.n_kd, hidden.device))
        loss, stats = FusedCEKD.apply(hidden, weight, x.labels, loss_scale(ce_weight, ce_denominator, x.n_ce,
                                                                           hidden.device), (teacher,), x.config)
    return cekd_output(loss, stats, x.n_ce, x.n_kd)
