"""Structural rules of the code base, checked on the source (no imports executed):

- the teacher side (`cache_tools`) never imports the student side (`distill`): a cache is built without the trainer;
- library code (`cache_tools`, `distill`) never imports demo, benchmark or test code (`examples`, `bench`, `tests`,
  or the test fixture modules), so the installed package works without them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NON_LIBRARY = {"examples", "bench", "tests", "conftest", "cache_fixtures", "cache_testing", "xtok_fixtures"}


def imported_top_levels(path: Path) -> set[str]:
    """Top-level package names imported anywhere in a module (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("cache_tools"), ids=lambda p: str(p.relative_to(REPO)))
def test_teacher_side_never_imports_student_side(path):
    assert "distill" not in imported_top_levels(path), f"{path.relative_to(REPO)} imports distill"


@pytest.mark.parametrize("path", modules("cache_tools") + modules("distill"), ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_demo_bench_or_tests(path):
    bad = imported_top_levels(path) & NON_LIBRARY
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from distill.losses import KDConfig\n    import bench.common\n")
    assert {"distill", "bench"} <= imported_top_levels(probe)


def test_bench_and_examples_are_not_installed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith(("bench", "examples", "tests")) for pattern in include)
