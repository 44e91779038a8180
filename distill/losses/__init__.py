"""Distillation losses: the fused chunked CE + KD kernel, its plain reference, auxiliary losses and weight schedules."""

from distill.losses.core import (
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    CEKDOutput,
    KDConfig,
    fused_ce_kd_loss,
    naive_ce_kd_loss,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "IGNORE_INDEX", "CEKDOutput", "KDConfig", "fused_ce_kd_loss", "naive_ce_kd_loss"]
