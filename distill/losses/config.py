"""What the CE + KD loss computes: `KDConfig` (checked once, when it is built), `IGNORE_INDEX`, the default chunk size
and the target kinds the loss understands.

The training config builds one `KDConfig` from its flags (`KDConfig.from_args`), sets the caches' target kind
(`for_targets`) and hands it to the model, which passes it to the kernel unchanged. Every impossible setting is found
by `__post_init__`; the kernel only asks `validate()`, which raises what construction found and costs nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill.losses.divergences import DIVERGENCES, KD_KINDS, PARAMS

IGNORE_INDEX = -100  # labels at positions with no next token (last position, padding): no CE there
# Rows per chunk of the fused kernel: time per step is flat from 256 to 1024 rows while peak memory grows with the
# chunk, so the smallest measured chunk (docs/RESULTS.md, loss section).
DEFAULT_CHUNK_SIZE = 256
# What `topk_logprobs` / `tail_logprob` may hold: exact top-k + tail, or RS-KD draws. The cache format names the same
# kinds (`cache_tools.format.schema.TARGET_KINDS`); tests/test_losses_registry.py keeps the two equal, so the losses
# need not import the format.
TARGET_KINDS = ("topk", "sampled")
# KDConfig field -> trainer flag, where the flag is spelled otherwise (every other field is its own flag).
FLAG_NAMES = {"kind": "kd_kind", "chunk_size": "loss_chunk_size"}


@dataclass(frozen=True)
class KDConfig:
    """What the CE + KD loss computes; passed to the kernel as is. Frozen: what construction checked stays true."""

    kind: str = "forward_kl"  # a key of DIVERGENCES
    temperature: float = 1.0  # student softmax(logits / T) (and the teacher's, unless already tempered), KD x T^2
    use_tail: bool = True  # tail bucket on (default) or off (renormalise over the top-k support)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # rows per chunk of the fused kernel: memory ~ 2-3 x chunk x V x 4 bytes
    targets: str = "topk"  # one of TARGET_KINDS: what topk_logprobs / tail_logprob hold
    # Whether the teacher's log-masses already are the tempered distribution (the loss uses them as given, and the
    # student's tail bucket aggregates its tokens at T so both sides match), or are raw log-probs the loss tempers
    # (the tail then counts as ONE token on both sides). None = what `targets` implies: sampled draws are made at
    # the sample temperature (tempered), top-k log-probs are raw.
    teacher_tempered: bool | None = None
    # Divergence parameters: one field per Param in DIVERGENCES (same name and default; a test checks).
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1

    def __post_init__(self) -> None:
        # Not a field: equality, repr and `dataclasses.fields` see the settings only.
        object.__setattr__(self, "_problems", tuple(self._find_problems(lambda f: f"KDConfig.{f}")))

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> KDConfig:
        """Build from an object holding the trainer flags (kd_kind, temperature, use_tail, loss_chunk_size and every
        divergence parameter by name); `overrides` set fields directly (e.g. targets=...). Never raises on bad
        values: call `problems()` / `validate()`."""
        values = {f.name: getattr(args, FLAG_NAMES.get(f.name, f.name)) for f in dataclasses.fields(cls)
                  if hasattr(args, FLAG_NAMES.get(f.name, f.name))}
        return cls(**{**values, **overrides})

    def for_targets(self, kind: str) -> KDConfig:
        """This config for targets of `kind` (the teacher's tempering follows the kind)."""
        return dataclasses.replace(self, targets=kind, teacher_tempered=None)

    @property
    def tempers_teacher(self) -> bool:
        """True when the loss divides the teacher's log-masses by T itself (they are raw log-probs)."""
        return not (self.targets == "sampled" if self.teacher_tempered is None else self.teacher_tempered)

    def problems(self, flags: bool = False) -> list[str]:
        """Every impossible setting, one line each naming the field (`--flag` if `flags`) and the fix."""
        if not flags:
            return list(self._problems)
        return self._find_problems(lambda f: "--" + FLAG_NAMES.get(f, f))

    def validate(self) -> KDConfig:
        """Raise ValueError (one line listing every problem construction found); return self."""
        if self._problems:
            raise ValueError("; ".join(self._problems))
        return self

    def _find_problems(self, name: Callable[[str], str]) -> list[str]:
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


def _sampled_problems(config: KDConfig, name: Callable[[str], str]) -> list[str]:
    found = []
    divergence = DIVERGENCES.get(config.kind)
    if divergence is not None and not divergence.sampled_ok:
        found.append(f"{name('kind')} {config.kind} is not defined on sampled targets: {divergence.why_not_sampled}; "
                     f"use {'|'.join(k for k, d in DIVERGENCES.items() if d.sampled_ok)}")
    if not config.use_tail:
        found.append(f"{name('use_tail')} false renormalises the student over the sampled ids, which drops the "
                     "student's mass elsewhere from the gradient (biased); keep it true for sampled targets")
    if config.tempers_teacher:
        found.append("KDConfig.teacher_tempered false: sampled targets are drawn at the sample temperature and "
                     "cannot be re-tempered; leave it None (or true)")
    return found


def check_kd_for_targets(kd: KDConfig, target_kind: str, sample_temperature: float = 1.0) -> list[str]:
    """Every problem (one line each, naming the trainer flag and the fix) with training `kd` on a cache whose targets
    are `target_kind` ("topk" | "sampled", the manifest's targets.kind) drawn at `sample_temperature`."""
    name = lambda f: "--" + FLAG_NAMES.get(f, f)  # noqa: E731
    if target_kind not in TARGET_KINDS:
        return [f"the cache's target kind {target_kind!r} is unknown to this trainer (it knows "
                f"{'|'.join(TARGET_KINDS)}); update distill"]
    found = kd.for_targets(target_kind).problems(flags=True)
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
