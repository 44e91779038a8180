"""The divergence registry: every KD kind, its parameters and the targets it is defined on, in one place.

A divergence works on bucket distributions (the teacher's listed ids, then the tail bucket; see
`distill.losses.buckets`): log_p, log_q [R, B] fp32, tempered and normalised, invalid buckets at probability exactly 0
(log-values finite, so 0 * log 0 terms stay 0). It gives
- `value(log_p, log_q, config) -> [R]`: the divergence per row. The naive reference backpropagates through it; on
  full-vocabulary distributions (B = V) it IS the plain full-logit KD.
- `grad(log_p, log_q, config) -> [R, B]` (optional): d value / d s, s = the student's tempered bucket logits, used by
  the fused kernel; without it the kernel takes the gradient of `value` by autograd (tests check they agree).
- `params`: its `KDConfig` fields (a float each, default, open range, help): one generated trainer flag each.
- `sampled_ok`: whether it is defined on SAMPLED targets (counts/N of N draws, no tail; `why_not_sampled` otherwise).

How to add a divergence: write its `value` (and `grad` if you want to skip autograd), add a `Divergence(...)` to
`DIVERGENCES` and, if it has a parameter, a field of that name on `KDConfig` (`distill/losses/config.py`); the trainer
flag of the same name is generated from `PARAMS` (`distill/training/arguments.py`) and `KDConfig.from_args` picks it
up by name. Tests in tests/test_losses_registry.py check every registered divergence (zero on identical
distributions, analytic gradient == autograd, params declared).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor

@dataclass(frozen=True)
class Param:
    name: str  # the KDConfig field and the trainer flag (--name)
    default: float
    low: float  # valid values lie strictly between low and high
    high: float
    help: str


@dataclass(frozen=True)
class Divergence:
    name: str
    value: Callable[[Tensor, Tensor, Any], Tensor]
    grad: Callable[[Tensor, Tensor, Any], Tensor] | None = None
    params: tuple[Param, ...] = ()
    sampled_ok: bool = False
    why_not_sampled: str = ""
    help: str = ""


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """[R, B] x 2 -> [R] KL(a || b); zero-probability buckets of `a` add exactly 0."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _softmax_jacobian(log_q: Tensor, g: Tensor) -> Tensor:
    """d f / d s for f with d f / d q = g, q = softmax(s): q * (g - sum(q * g)). [R, B] -> [R, B]."""
    q = log_q.exp()
    return q * (g - (q * g).sum(-1, keepdim=True))


def _jsd_log_m(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _jsd_value(log_p: Tensor, log_q: Tensor, config: Any) -> Tensor:
    # Generalised JSD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q; <= H(beta).
    beta = config.jsd_beta
    log_m = _jsd_log_m(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _jsd_grad(log_p: Tensor, log_q: Tensor, config: Any) -> Tensor:
    # d JSD / d q_j = (1 - beta) * (log q_j - log m_j): the p-terms' derivatives through m cancel.
    beta = config.jsd_beta
    return _softmax_jacobian(log_q, (1 - beta) * (log_q - _jsd_log_m(log_p, log_q, beta)))


_NO_SAMPLED = ("the teacher's probability of an unsampled token is unknown (it is not 0), so {what} cannot be "
               "estimated from counts/N without bias")

DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence(
            name="forward_kl",
            value=lambda log_p, log_q, config: _kl(log_p, log_q),
            grad=lambda log_p, log_q, config: log_q.exp() - log_p.exp(),
            sampled_ok=True,  # linear in p: E[q - counts/N] = q - p
            help="KL(teacher || student), mass-covering",
        ),
        Divergence(
            name="reverse_kl",
            value=lambda log_p, log_q, config: _kl(log_q, log_p),
            grad=lambda log_p, log_q, config: _softmax_jacobian(log_q, log_q - log_p),
            why_not_sampled=_NO_SAMPLED.format(what="KL(student || teacher), which needs log p on every token,"),
            help="KL(student || teacher), mode-seeking",
        ),
        Divergence(
            name="jsd",
            value=_jsd_value,
            grad=_jsd_grad,
            params=(Param("jsd_beta", 0.5, 0.0, 1.0, "Mixture weight of JSD(beta)."),),
            why_not_sampled=_NO_SAMPLED.format(what="the mixture m = beta * p + (1 - beta) * q"),
            help="generalised Jensen-Shannon, bounded by H(beta)",
        ),
        Divergence(
            name="skew_kl",
            value=lambda log_p, log_q, config: _kl(log_p, _jsd_log_m(log_p, log_q, config.skew_alpha)),
            params=(Param("skew_alpha", 0.1, 0.0, 1.0, "Skew of KL(p || alpha p + (1 - alpha) q)."),),
            why_not_sampled=_NO_SAMPLED.format(what="the skewed mixture alpha * p + (1 - alpha) * q"),
            help="skew KL (DistiLLM), KL(p || alpha p + (1 - alpha) q)",
        ),
    )
}
KD_KINDS = tuple(DIVERGENCES)
PARAMS: dict[str, Param] = {p.name: p for d in DIVERGENCES.values() for p in d.params}
