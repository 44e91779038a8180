"""Distillation losses (API contract; the loss helper replaces the naive body with the fused chunked version).

Shapes: N = rows (tokens, flattened batch x positions), H = student hidden, V = student vocab (LM-head rows),
K = teacher top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class KDConfig:
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    jsd_beta: float = 0.5
    use_tail: bool = True  # tail bucket on (default) or off (renormalise over the top-k support)
    chunk_size: int = 1024


@dataclass
class CEKDOutput:
    loss: torch.Tensor  # scalar, differentiable: ce_weight * ce + kd_weight * kd
    ce: torch.Tensor  # scalar, detached: mean CE over rows with a label
    kd: torch.Tensor  # scalar, detached: mean KD over rows in kd_mask
    n_ce: int  # rows with a label
    n_kd: int  # rows in kd_mask
    top1_agree: torch.Tensor  # scalar, detached: fraction of kd rows where student argmax == teacher top-1
    covered_mass: torch.Tensor  # scalar, detached: mean student probability mass on the teacher's top-k ids


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
) -> CEKDOutput:
    """CE on `labels` plus KD on the sparse teacher targets, from hidden states and the LM-head weight.

    Args:
        hidden: [N, H] student final hidden states (any float dtype; logits are built in fp32).
        weight: [V, H] LM-head weight.
        labels: [N] int64 next-token ids, IGNORE_INDEX where there is none.
        topk_ids: [N, K] int64 teacher ids (student vocabulary), sorted by teacher log-prob descending.
        topk_logprobs: [N, K] float32 teacher log-probs (normalised over the teacher vocabulary).
        tail_logprob: [N] float32 log of the teacher mass outside the top-k.
        kd_mask: [N] bool, rows where KD applies.
    """
    config = config or KDConfig()
    logits = hidden.float() @ weight.float().t()
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits[valid], labels[valid]) if valid.any() else logits.sum() * 0
    logq = torch.log_softmax(logits[kd_mask] / config.temperature, dim=-1)
    p = topk_logprobs[kd_mask].exp()
    lq_k = logq.gather(1, topk_ids[kd_mask])
    kd_rows = (p * (topk_logprobs[kd_mask] - lq_k)).sum(-1)
    kd = kd_rows.mean() * config.temperature**2 if kd_mask.any() else logits.sum() * 0
    top1 = (logq.argmax(-1) == topk_ids[kd_mask][:, 0]).float().mean() if kd_mask.any() else ce.new_zeros(())
    covered = lq_k.exp().sum(-1).mean() if kd_mask.any() else ce.new_zeros(())
    return CEKDOutput(
        loss=ce_weight * ce + kd_weight * kd,
        ce=ce.detach(),
        kd=kd.detach(),
        n_ce=int(valid.sum()),
        n_kd=int(kd_mask.sum()),
        top1_agree=top1.detach(),
        covered_mass=covered.detach(),
    )
