"""The loss-component registry: ONE entry per term of the training loss, read by every module that needs the list.

A component `c` gets, from its entry alone:
- config: `--{c}_weight` (base weight) and `--{c}_schedule` (ramp), plus any `params` (e.g. a temperature), generated
  into `LossArguments` and validated there (`distill.training.config`);
- the model: CE and KD come out of the fused kernel (`source="cekd"`); an `"aux"` component is `compute(projected
  [B, P, Ht], teacher [B, P, Ht], **params) -> scalar` on the pooled hidden states, through the projection heads,
  which are built only when some aux weight is non-zero and are exported beside the student
  (`distill.training.modeling`, `distill.training.export`);
- logs: TensorBoard `train/loss/{c}`, `train/weighted/{c}`, `train/weight/{c}`; the console shows `loss/{c}`
  (`distill.training.metrics`, `distill.training.callbacks`).

Adding an auxiliary loss = write its function (e.g. in `distill/losses/aux.py`) and add one entry below; see
docs/ARCHITECTURE.md ("How to add ...") for the worked example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.losses.aux import contrastive_loss, feature_loss


@dataclass(frozen=True)
class ComponentParam:
    """A scalar parameter of a component, exposed as `--{name}` (must be > 0 when `positive`)."""

    name: str
    default: float
    help: str
    positive: bool = True


@dataclass(frozen=True)
class LossComponent:
    """One term of the loss.

    name: config prefix and log suffix. default_weight / help: of `--{name}_weight`.
    source: "cekd" (computed by the fused CE+KD kernel: "ce" or "kd") or "aux" (pooled hidden states).
    count: which micro-batches its running mean is taken over: "all", "kd" (those with KD rows) or "aux" (those where
        the aux losses ran), so a window where it was not computed never shows a fake 0.
    needs_teacher: refused in LM-only mode (no teacher targets) when its weight is non-zero.
    compute: aux only, `(projected [B, P, Ht] fp32, teacher [B, P, Ht] fp32, **params) -> scalar fp32`.
    console: shown on the one-line console log (TensorBoard always gets it).
    """

    name: str
    default_weight: float
    help: str
    source: str
    count: str = "all"
    needs_teacher: bool = True
    compute: Callable[..., torch.Tensor] | None = None
    params: tuple[ComponentParam, ...] = field(default_factory=tuple)
    console: bool = True

    @property
    def weight_field(self) -> str:
        return f"{self.name}_weight"

    @property
    def schedule_field(self) -> str:
        return f"{self.name}_schedule"

    @property
    def exported(self) -> bool:
        """Its learned projection heads are exported beside the student (aux components)."""
        return self.source == "aux"

    def tag(self, kind: str) -> str:
        """Log tag `{kind}/{name}`: kind "loss" (raw value), "weighted" (x weight) or "weight" (the scheduled
        weight); TensorBoard shows them under `train/`."""
        return f"{kind}/{self.name}"


def _contrastive(projected: torch.Tensor, teacher: torch.Tensor, *, contrastive_temperature: float) -> torch.Tensor:
    return contrastive_loss(projected, teacher, temperature=contrastive_temperature)


COMPONENTS: tuple[LossComponent, ...] = (
    LossComponent("ce", 1.0, "Base weight of the LM (cross-entropy) loss.", source="cekd", needs_teacher=False),
    LossComponent("kd", 1.0, "Base weight of the KD loss on the sparse targets.", source="cekd", count="kd"),
    LossComponent("feature", 0.0, "Base weight of 1 - cos(P(student), teacher).", source="aux", count="aux",
                  compute=lambda projected, teacher: feature_loss(projected, teacher)),
    LossComponent("contrastive", 0.0, "Base weight of the in-batch InfoNCE loss.", source="aux", count="aux",
                  compute=_contrastive,
                  params=(ComponentParam("contrastive_temperature", 0.1, "InfoNCE temperature."),)),
)
BY_NAME: dict[str, LossComponent] = {c.name: c for c in COMPONENTS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
AUX: tuple[LossComponent, ...] = tuple(c for c in COMPONENTS if c.source == "aux")


def weights_of(loss_args: Any) -> dict[str, float]:
    """{name: base weight} read from a `LossArguments`."""
    return {c.name: float(getattr(loss_args, c.weight_field)) for c in COMPONENTS}


def aux_params(loss_args: Any) -> dict[str, dict[str, float]]:
    """{aux component: {param: value}} read from a `LossArguments` (what `compute` receives as keywords)."""
    return {c.name: {p.name: float(getattr(loss_args, p.name)) for p in c.params} for c in AUX}


def wants_aux(weights: dict[str, float]) -> bool:
    """True when some aux component has a non-zero weight (the projection heads are needed)."""
    return any(weights.get(c.name, 0.0) for c in AUX)
