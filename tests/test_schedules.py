"""Weight schedules at 0%, 50% and 100% of training, absolute steps, windows and bad specs."""

from __future__ import annotations

import math

import pytest

from distill.losses.schedules import parse_ramp, parse_weight

TOTAL = 1000


@pytest.mark.parametrize(
    ("spec", "at_0", "at_50", "at_100"),
    [
        ("constant", 1.0, 1.0, 1.0),
        (None, 1.0, 1.0, 1.0),
        ("linear", 0.0, 0.5, 1.0),
        ("cosine", 0.0, 0.5, 1.0),
        ("linear:0:0.25", 0.0, 1.0, 1.0),
        ("linear:0.5:1", 0.0, 0.0, 1.0),
        ("linear:0:1:1:0", 1.0, 0.5, 0.0),
        ("cosine:0:1:2:0", 2.0, 1.0, 0.0),
        ("linear:0:2000s", 0.0, 0.25, 0.5),
        ("linear:0.5:0.5:0.1:1", 0.1, 1.0, 1.0),
        ({"kind": "linear", "start": "250s", "end": 0.75}, 0.0, 0.5, 1.0),
    ],
)
def test_ramp_at_0_50_100_percent(spec, at_0, at_50, at_100):
    ramp = parse_ramp(spec)
    assert [ramp(s, TOTAL) for s in (0, TOTAL // 2, TOTAL)] == pytest.approx([at_0, at_50, at_100])


def test_cosine_shape_between_points():
    ramp = parse_ramp("cosine:0:1")
    assert ramp(250, TOTAL) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert parse_ramp("linear:0:1")(250, TOTAL) == pytest.approx(0.25)


def test_weight_is_base_times_ramp():
    schedule = parse_weight(0.5, "linear:0:0.5")
    assert [schedule(s, TOTAL) for s in (0, 250, 500, TOTAL)] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    assert parse_weight(None, 2.0)(TOTAL, TOTAL) == 2.0
    assert parse_weight(1.0, {"kind": "cosine", "base": 3.0})(TOTAL // 2, TOTAL) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("exp:0:1", "kind"),
        ("linear:0", "KIND:START:END"),
        ("linear:0:1.5", "outside"),
        ("linear:x:1", "neither"),
        ("linear:0.8:0.2", "after END"),
        ("linear:0:1:a:b", "numbers"),
        ({"kind": "linear", "stop": 1}, "unknown keys"),
        (["linear"], "string"),
    ],
)
def test_bad_specs_raise_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_ramp(spec)
    assert "\n" not in str(info.value)
