"""The divergence registry: every KD kind, its parameters and the targets it is defined on, in one place; `KDConfig`.

A divergence works on bucket distributions (the teacher's listed ids, then the tail bucket; see
`distill.losses.buckets`): log_p, log_q [R, B] fp32, tempered and normalised, invalid buckets at probability exactly 0
(log-values finite, so 0 * log 0 terms stay 0). It gives
- `value(log_p, log_q, config) -> [R]`: the divergence per row. The naive reference backpropagates through it; on
  full-vocabulary distributions (B = V) it IS the plain full-logit KD.
- `grad(log_p, log_q, config) -> [R, B]` (optional): d value / d s, s = the student's tempered bucket logits, used by
  the fused kernel; without it the kernel takes the gradient of `value` by autograd (tests check they agree).
- `params`: its `KDConfig` fields (a float each, default, open range, help): one flag each in the trainer config.
- `sampled_ok`: whether it is defined on SAMPLED targets (counts/N of N draws, no tail; `why_not_sampled` otherwise).

How to add a divergence: write its `value` (and `grad` if you want to skip autograd), add a `Divergence(...)` to
`DIVERGENCES` and, if it has a parameter, a field of that name on `KDConfig` below; then the trainer flag of the same
name in `distill/training/config.py` (`KDConfig.from_args` picks it up by name). Tests in tests/test_losses_registry.py
check every registered divergence (zero on identical distributions, analytic gradient == autograd, params declared).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor

# From `python -m bench.bench_loss --chunks 256,512,1024` (CPU, fp32, N=8192, H=576, K=256): time per step is flat
# across 256-1024 rows (10.1-10.8 s at V=49,152; 33-37 s at V=151,936) while peak memory grows with the chunk
# (183 / 236 / 367 MiB at V=49,152; 514 / 662 / 974 MiB at V=151,936), so the smallest measured chunk wins.
DEFAULT_CHUNK_SIZE = 256
# What the per-example dict's teacher fields hold: "topk" = top-k log-probs + tail mass (tempered by the loss);
# "sampled" = log(count / N) of N draws made at the cache's sample temperature, tail -inf (used as given).


# What `topk_logprobs` / `tail_logprob` may hold: exact top-k + tail, or RS-KD draws. The cache format names the same
# kinds (`cache_tools.format.schema.TARGET_KINDS`); tests/test_losses_registry.py keeps the two equal, so the losses
# need not import the format.
TARGET_KINDS = ("topk", "sampled")


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
# KDConfig field -> trainer flag, where the flag is spelled otherwise (every other field is its own flag).
FLAG_NAMES = {"kind": "kd_kind", "chunk_size": "loss_chunk_size"}


@dataclass
class KDConfig:
    """What the CE + KD loss computes; passed to the kernel as is."""

    kind: str = "forward_kl"  # a key of DIVERGENCES
    temperature: float = 1.0  # both sides softmax(log-mass / T), KD x T^2 (sampled targets: the student side only)
    use_tail: bool = True  # tail bucket on (default) or off (renormalise over the top-k support)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # rows per chunk of the fused kernel: memory ~ 2-3 x chunk x V x 4 bytes
    targets: str = "topk"  # one of TARGET_KINDS: what topk_logprobs / tail_logprob hold
    # Divergence parameters: one field per Param in DIVERGENCES (same name and default; a test checks).
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> KDConfig:
        """Build from an object holding the trainer flags (kd_kind, temperature, use_tail, loss_chunk_size and every
        divergence parameter by name); `overrides` set fields directly (e.g. targets=...). Never raises on bad
        values: call `problems()` / `validate()`."""
        values = {f.name: getattr(args, FLAG_NAMES.get(f.name, f.name)) for f in dataclasses.fields(cls)
                  if hasattr(args, FLAG_NAMES.get(f.name, f.name))}
        return cls(**{**values, **overrides})

    def problems(self, flags: bool = False) -> list[str]:
        """Every impossible setting, one line each naming the field (`--flag` if `flags`) and the fix."""
        name = (lambda f: "--" + FLAG_NAMES.get(f, f)) if flags else (lambda f: f"KDConfig.{f}")
        found = []
        if self.kind not in DIVERGENCES:
            found.append(f"{name('kind')} must be one of {'|'.join(KD_KINDS)}, got {self.kind!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            found.append(f"{name('temperature')} must be a finite number > 0, got {self.temperature}")
        for p in PARAMS.values():
            value = getattr(self, p.name)
            if not p.low < value < p.high:
                found.append(f"{name(p.name)} must be in ({p.low:g}, {p.high:g}), got {value}")
        if int(self.chunk_size) < 1:
            found.append(f"{name('chunk_size')} must be >= 1 (rows per chunk), got {self.chunk_size}")
        if self.targets not in TARGET_KINDS:
            found.append(f"KDConfig.targets must be one of {'|'.join(TARGET_KINDS)}, got {self.targets!r}")
        elif self.targets == "sampled":
            found += _sampled_problems(self, name)
        return found

    def validate(self) -> KDConfig:
        """Raise ValueError (one line listing every problem) for impossible settings; return self."""
        found = self.problems()
        if found:
            raise ValueError("; ".join(found))
        return self


def _sampled_problems(config: KDConfig, name: Callable[[str], str]) -> list[str]:
    found = []
    divergence = DIVERGENCES.get(config.kind)
    if divergence is not None and not divergence.sampled_ok:
        found.append(f"{name('kind')} {config.kind} is not defined on sampled targets: {divergence.why_not_sampled}; "
                     f"use {'|'.join(k for k, d in DIVERGENCES.items() if d.sampled_ok)}")
    if not config.use_tail:
        found.append(f"{name('use_tail')} false renormalises the student over the sampled ids, which drops the "
                     "student's mass elsewhere from the gradient (biased); keep it true for sampled targets")
    return found


def check_kd_for_targets(kd: KDConfig, target_kind: str, sample_temperature: float = 1.0) -> list[str]:
    """Every problem (one line each, naming the trainer flag and the fix) with training `kd` on a cache whose targets
    are `target_kind` ("topk" | "sampled", the manifest's targets.kind) drawn at `sample_temperature`."""
    name = lambda f: "--" + FLAG_NAMES.get(f, f)  # noqa: E731
    if target_kind not in TARGET_KINDS:
        return [f"the cache's target kind {target_kind!r} is unknown to this trainer (it knows "
                f"{'|'.join(TARGET_KINDS)}); update distill"]
    found = dataclasses.replace(kd, targets=target_kind).problems(flags=True)
    if kd.targets != target_kind:
        found.append(f"KDConfig.targets={kd.targets!r} but the cache holds {target_kind!r} targets; build the "
                     f"KDConfig with targets={target_kind!r}")
    if target_kind == "sampled" and not math.isclose(kd.temperature, sample_temperature, rel_tol=1e-6):
        found.append(
            f"{name('temperature')} {kd.temperature:g} differs from the temperature the cache's samples were drawn "
            f"at ({sample_temperature:g}): counts/N estimate the teacher at {sample_temperature:g}, and a sample "
            "cannot be re-tempered (unsampled tokens have unknown mass, (counts/N)^(1/T) is biased); set "
            f"{name('temperature')} {sample_temperature:g} or rebuild the cache with --sample-temperature "
            f"{kd.temperature:g}")
    return found
