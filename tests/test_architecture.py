"""Structural rules of the code base, checked on the source (no imports executed):

- the teacher side (`cache_tools`) never imports the student side (`distill`): a cache is built without the trainer;
- the student side reaches the teacher side only through the format package (`cache_tools.format`), which itself
  imports nothing else of `cache_tools`: the format is the contract, the builder is not;
- on the student side, data never imports training, and the losses never import the cache format (they are pure
  functions of tensors);
- library code (`cache_tools`, `distill`) never imports demo, benchmark or test code (`examples`, `bench`, `tests`,
  or the test fixture modules), so the installed package works without them;
- error classes are imported at module level (a function-local import hides which errors a module raises).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NON_LIBRARY = {"examples", "bench", "tests", "conftest", "cache_fixtures", "cache_testing", "chat_fixtures",
               "xtok_fixtures", "loss_testing"}


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module imported anywhere in a module (also inside functions); `from a import b` counts
    as `a.b` (b may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_top_levels(path: Path) -> set[str]:
    """Top-level package names imported anywhere in a module."""
    return {name.split(".")[0] for name in imported_modules(path)}


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("cache_tools"), ids=lambda p: str(p.relative_to(REPO)))
def test_teacher_side_never_imports_student_side(path):
    assert "distill" not in imported_top_levels(path), f"{path.relative_to(REPO)} imports distill"


@pytest.mark.parametrize("path", modules("distill"), ids=lambda p: str(p.relative_to(REPO)))
def test_student_side_reaches_teacher_side_only_through_the_format(path):
    bad = {m for m in imported_modules(path) if _under(m, "cache_tools") and not _under(m, "cache_tools.format")}
    # `from cache_tools import format` names the package itself
    bad.discard("cache_tools.format")
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}; import from cache_tools.format"


@pytest.mark.parametrize("path", modules("cache_tools/format"), ids=lambda p: str(p.relative_to(REPO)))
def test_format_package_stands_alone(path):
    bad = {m for m in imported_modules(path) if _under(m, "cache_tools") and not _under(m, "cache_tools.format")}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: the format may not depend on the builder"


@pytest.mark.parametrize("path", modules("distill/data"), ids=lambda p: str(p.relative_to(REPO)))
def test_data_never_imports_training(path):
    bad = {m for m in imported_modules(path) if _under(m, "distill.training")}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("distill/losses"), ids=lambda p: str(p.relative_to(REPO)))
def test_losses_never_import_the_cache_format(path):
    bad = {m for m in imported_modules(path) if _under(m, "cache_tools") or _under(m, "distill.data")}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("cache_tools") + modules("distill"), ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_demo_bench_or_tests(path):
    bad = imported_top_levels(path) & NON_LIBRARY
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def local_error_imports(path: Path) -> list[str]:
    """'function: names' for every import of the error module made inside a function body."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module in ("cache_tools.format.errors", "errors"):
                    found.append(f"{node.name}: {', '.join(a.name for a in inner.names)}")
    return found


@pytest.mark.parametrize("path", modules("cache_tools") + modules("distill"), ids=lambda p: str(p.relative_to(REPO)))
def test_error_classes_are_imported_at_module_level(path):
    assert not local_error_imports(path), f"{path.relative_to(REPO)}: {local_error_imports(path)}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from distill.losses import KDConfig\n    import bench.common\n")
    assert {"distill", "bench"} <= imported_top_levels(probe)
    assert "distill.losses.KDConfig" in imported_modules(probe)
    probe.write_text("def f():\n    from cache_tools.format.errors import CacheError\n")
    assert local_error_imports(probe) == ["f: CacheError"]


def test_bench_and_examples_are_not_installed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith(("bench", "examples", "tests")) for pattern in include)
