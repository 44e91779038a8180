"""Baseline for the benchmarks and the ablation, NOT a product feature: online knowledge distillation with the teacher
running every step and the KD loss over the full vocabulary (what the cache replaces).

Shapes: B = batch, T = positions, V = vocabulary (teacher and student share it here), N = B*T rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def full_logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE on labels + forward KL(teacher || student) over the full vocabulary, T^2-scaled, on labelled rows.

    Args:
        student_logits: [B, T, V] (any float dtype; computed in fp32).
        teacher_logits: [B, T, V'] with V' >= V; padded teacher head rows beyond V are dropped.
        labels: [B, T] next-token ids, IGNORE_INDEX where there is none.
    Returns: (loss, ce, kd) scalars; ce and kd detached.
    """
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits[..., :vocab].reshape(-1, vocab).float()
    flat = labels.reshape(-1)
    valid = flat != IGNORE_INDEX
    ce = F.cross_entropy(s[valid], flat[valid])
    log_q = torch.log_softmax(s[valid] / temperature, dim=-1)
    log_p = torch.log_softmax(t[valid] / temperature, dim=-1)
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
    return ce_weight * ce + kd_weight * kd, ce.detach(), kd.detach()


@dataclass
class OnlineKDStep:
    """One optimizer step of online full-logit KD: teacher forward (no grad) + student forward/backward + step."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    temperature: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """input_ids, labels: [B, T]. Returns the step's loss components as floats."""
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
        student_logits = self.student(input_ids=input_ids).logits
        loss, ce, kd = full_logit_kd_loss(
            student_logits, teacher_logits, labels,
            temperature=self.temperature, ce_weight=self.ce_weight, kd_weight=self.kd_weight,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "ce": float(ce), "kd": float(kd)}


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] labels with labels[:, t] = input_ids[:, t+1] and IGNORE_INDEX at the last position."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
