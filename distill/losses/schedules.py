"""Weight schedules: every loss component's weight at a step is `base x ramp(step)`.

Spec (string, dict, number or None):
- ``"constant"`` (also None or a bare number, which sets the base): ramp = 1 throughout.
- ``"linear:START:END"``: ramp = 0 up to START, rises linearly to 1 at END, stays 1 after.
- ``"cosine:START:END"``: the same with a half-cosine rise, (1 - cos(pi * x)) / 2 for x in [0, 1].
- Optional ``":FROM:TO"`` after END sets the values at START / END instead of 0 / 1, e.g. ``"linear:0:1:1:0"``
  decays 1 -> 0 over the whole run. ``"linear"`` / ``"cosine"`` alone mean START=0, END=1.
- START / END are FRACTIONS of the total optimizer steps (0 <= x <= 1), or ABSOLUTE optimizer steps written with an
  ``s`` suffix (``"linear:0:500s"``). Progress at `step` (optimizer steps already taken, 0-based) is
  step / total_steps, so step 0 is 0% and step == total_steps is 100%. START == END gives a step change.
- Dict form: ``{"kind": "linear", "start": 0.0, "end": 0.3, "from": 0.0, "to": 1.0, "base": 1.0}``; start / end may
  be strings like ``"500s"``. Every key but ``kind`` is optional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Position:
    """A point in training: a fraction of total steps, or an absolute step count (`is_steps`)."""

    value: float
    is_steps: bool = False

    def step(self, total_steps: int) -> float:
        return self.value if self.is_steps else self.value * total_steps


def _position(raw: Any, spec: Any) -> Position:
    text = str(raw).strip()
    try:
        if text.endswith("s"):
            steps = float(text[:-1])
            if steps < 0 or steps != int(steps):
                raise ValueError
            return Position(steps, is_steps=True)
        frac = float(text)
    except ValueError:
        raise ValueError(
            f"schedule {spec!r}: position {raw!r} is neither a fraction in [0, 1] nor steps like '500s'"
        ) from None
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"schedule {spec!r}: fraction {frac} is outside [0, 1]; write absolute steps as e.g. '500s'")
    return Position(frac)


@dataclass(frozen=True)
class Ramp:
    kind: str = "constant"
    start: Position = Position(0.0)
    end: Position = Position(1.0)
    from_value: float = 0.0
    to_value: float = 1.0

    def __call__(self, step: int, total_steps: int) -> float:
        """The multiplier at optimizer step `step` of `total_steps`."""
        if self.kind == "constant":
            return 1.0
        start, end = self.start.step(total_steps), self.end.step(total_steps)
        if step >= end:
            x = 1.0
        elif step <= start:
            x = 0.0
        else:
            x = (step - start) / (end - start)
        if self.kind == "cosine":
            x = (1.0 - math.cos(math.pi * x)) / 2.0
        return self.from_value + (self.to_value - self.from_value) * x


@dataclass(frozen=True)
class WeightSchedule:
    base: float = 1.0
    ramp: Ramp = Ramp()

    def __call__(self, step: int, total_steps: int) -> float:
        """base x ramp(step): the component's weight at optimizer step `step` of `total_steps`."""
        return self.base * self.ramp(step, total_steps)


def parse_ramp(spec: str | dict | None) -> Ramp:
    """Parse a ramp spec (see the module docstring); ValueError names the spec and the fix."""
    if spec is None:
        return Ramp()
    if isinstance(spec, dict):
        unknown = set(spec) - {"kind", "start", "end", "from", "to", "base"}
        if unknown:
            raise ValueError(f"schedule {spec!r}: unknown keys {sorted(unknown)}; use kind/start/end/from/to/base")
        fields = [spec.get("kind", "constant"), spec.get("start", 0.0), spec.get("end", 1.0)]
        fields += [spec.get("from", 0.0), spec.get("to", 1.0)]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.strip().split(":")]
        if len(parts) not in (1, 3, 5):
            raise ValueError(f"schedule {spec!r}: expected KIND, KIND:START:END or KIND:START:END:FROM:TO")
        fields = parts + ["0", "1", "0", "1"][len(parts) - 1 :]
    else:
        raise ValueError(f"schedule {spec!r}: give a string like 'linear:0:0.3' or a dict with a 'kind' key")
    kind = str(fields[0]).lower()
    if kind not in KINDS:
        raise ValueError(f"schedule {spec!r}: kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    try:
        from_value, to_value = float(fields[3]), float(fields[4])
    except ValueError:
        raise ValueError(f"schedule {spec!r}: FROM/TO values must be numbers") from None
    start, end = _position(fields[1], spec), _position(fields[2], spec)
    if start.is_steps == end.is_steps and start.value > end.value:
        raise ValueError(f"schedule {spec!r}: START is after END; to decrease, swap FROM/TO ('...:1:0') instead")
    return Ramp(kind, start, end, from_value, to_value)


def parse_weight(base: float | None, spec: str | dict | float | None = None) -> WeightSchedule:
    """A component's weight schedule from its base weight and ramp spec. A number as `spec` is a constant base;
    a dict's optional "base" overrides `base`."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return WeightSchedule(float(spec), Ramp())
    if isinstance(spec, dict) and "base" in spec:
        base = spec["base"]
    try:
        base_value = 1.0 if base is None else float(base)
    except (TypeError, ValueError):
        raise ValueError(f"schedule base weight {base!r} must be a number") from None
    if not math.isfinite(base_value):
        raise ValueError(f"schedule base weight {base!r} must be finite")
    return WeightSchedule(base_value, parse_ramp(spec))
