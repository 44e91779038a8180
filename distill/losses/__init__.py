"""Distillation losses: the fused chunked CE + KD kernel, its plain reference, the divergence registry, auxiliary
losses and weight schedules."""

from distill.losses.buckets import kd_slots
from distill.losses.config import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, TARGET_KINDS, KDConfig, check_kd_for_targets
from distill.losses.core import CEKDOutput, fused_ce_kd_loss
from distill.losses.divergences import DIVERGENCES, KD_KINDS
from distill.losses.multi import MultiCEKDOutput, TeacherTargets, fused_multi_ce_kd_loss
from distill.losses.reference import naive_ce_kd_loss

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIVERGENCES",
    "IGNORE_INDEX",
    "KD_KINDS",
    "TARGET_KINDS",
    "CEKDOutput",
    "KDConfig",
    "MultiCEKDOutput",
    "TeacherTargets",
    "check_kd_for_targets",
    "fused_ce_kd_loss",
    "fused_multi_ce_kd_loss",
    "kd_slots",
    "naive_ce_kd_loss",
]
