"""The suite itself: no wall-clock limit that can fail a correct run that was merely slow (a loaded machine)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_fails_a_correct_run_for_being_slow():
    limits = re.compile(r"timeout=\d|deadline = time\.monotonic\(\) \+ \d|wait_child\([^)]*, \d")
    found = [f"{path.relative_to(TESTS)}:{n}: {line.strip()}"
             for path in sorted(TESTS.rglob("*.py")) if path.name != Path(__file__).name
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if limits.search(line)]
    assert not found, "wall-clock limits in tests:\n" + "\n".join(found)
