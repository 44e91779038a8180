"""Auxiliary distillation losses on pooled hidden states, bounded by construction and computed in fp32.

Shapes: B = batch, L = sequence length, P = pooled layers, Hs / Ht = student / teacher hidden size.

- `masked_mean_pool`: mean of the student's hidden states over valid tokens (the cache pools the teacher the same way).
- `PooledProjection`: one learned linear map Hs -> Ht per pooled layer.
- `feature_loss`: mean over batch and layers of 1 - cos(P(student pooled), teacher pooled); always in [0, 2].
- `contrastive_loss`: in-batch InfoNCE on the same vectors with a fixed temperature, divided by its maximum, so it is
  always in [0, 1] (see the function for the bound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] hidden states, [B, L] mask (1 = real token) -> [B, H] fp32 mean over real tokens (0 if none)."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def pool_layers(
    hidden_states: Sequence[torch.Tensor], layers: Sequence[int], attention_mask: torch.Tensor
) -> torch.Tensor:
    """Pool the chosen entries of a model's `hidden_states` tuple (each [B, L, H]) -> [B, P, H] fp32."""
    return torch.stack([masked_mean_pool(hidden_states[i], attention_mask) for i in layers], dim=1)


class PooledProjection(nn.Module):
    """Maps student pooled states [B, P, student_dim] to the teacher's width [B, P, teacher_dim], one linear map per
    pooled layer (layers differ in scale and meaning, so they do not share one)."""

    def __init__(self, student_dim: int, teacher_dim: int, num_layers: int) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim, self.num_layers = student_dim, teacher_dim, num_layers
        self.layers = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_layers))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.ndim != 3 or pooled.shape[1:] != (self.num_layers, self.student_dim):
            raise ValueError(
                f"PooledProjection got pooled states of shape {tuple(pooled.shape)}; expected "
                f"[B, {self.num_layers}, {self.student_dim}] (num_layers and student_dim must match the student)"
            )
        pooled = pooled.float()
        # fp32 even when the module itself is held in bf16/fp16 by the engine.
        outs = [F.linear(pooled[:, i], lin.weight.float(), lin.bias.float()) for i, lin in enumerate(self.layers)]
        return torch.stack(outs, dim=1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dim in fp32. Dividing by the max |x| first keeps huge inputs (1e30) from
    overflowing the squared norm; zero vectors stay zero (cosine 0 with anything)."""
    x = x.float()
    x = x / x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return F.normalize(x, dim=-1, eps=1e-12)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(
            f"{name}: projected student {tuple(student.shape)} and teacher pooled {tuple(teacher.shape)} must both be "
            "[B, P, Ht]; project the student with PooledProjection first"
        )


def feature_loss(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over B and P of 1 - cos(projected, teacher). [B, P, Ht] x 2 -> scalar fp32 in [0, 2]."""
    _check_pair(projected, teacher, "feature_loss")
    cos = (_unit(projected) * _unit(teacher)).sum(-1)
    return (1.0 - cos).clamp(0.0, 2.0).mean()  # the clamp only removes rounding past the exact bounds


def contrastive_bound(batch_size: int, temperature: float) -> float:
    """The largest possible InfoNCE value for a row: log(1 + (B - 1) * exp(2 / temperature))."""
    return math.log1p((batch_size - 1) * math.exp(2.0 / temperature))


def contrastive_loss(projected: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric in-batch InfoNCE: example i's projected student vector must pick its own teacher vector among the
    batch's (and vice versa), per pooled layer, with scores cos / temperature. [B, P, Ht] x 2 -> scalar in [0, 1].

    Bound: scores lie in [-1/T, 1/T], so each row's loss log(1 + sum_{j != i} exp(s_ij - s_ii)) lies in
    (0, log(1 + (B - 1) exp(2/T))]; we divide by that maximum (`contrastive_bound`). With B < 2 there are no
    negatives and the loss is 0.
    """
    _check_pair(projected, teacher, "contrastive_loss")
    if not temperature > 0:
        raise ValueError(f"contrastive temperature={temperature} must be positive")
    batch, layers = projected.shape[:2]
    if batch < 2:
        return projected.float().sum() * 0.0
    student, target = _unit(projected).transpose(0, 1), _unit(teacher).transpose(0, 1)  # [P, B, Ht]
    scores = student @ target.transpose(1, 2) / temperature  # [P, B, B]
    labels = torch.arange(batch, device=scores.device).repeat(layers)
    rows = F.cross_entropy(scores.reshape(-1, batch), labels)
    cols = F.cross_entropy(scores.transpose(1, 2).reshape(-1, batch), labels)
    return ((rows + cols) / 2 / contrastive_bound(batch, temperature)).clamp(0.0, 1.0)
