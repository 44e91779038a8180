"""Fixtures of the fault suite: ONE small clean cache per session (every case damages a copy of it), and the
sources of foreign shards (a cache of another text, a cache with other settings), built only when a case needs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from faults.harness import build_argv


def _build(argv: list[str]) -> None:
    from cache_tools.cli import main

    assert main(argv) == 0, f"reference build failed: {argv}"


@pytest.fixture(scope="session")
def other_text_file(tmp_path_factory, corpus) -> Path:
    """Another dataset (other documents): shards built from it hold another text's targets."""
    path = tmp_path_factory.mktemp("faults_other") / "other.txt"
    path.write_text("\n".join(d.replace("\n", " ") for d in corpus[200:260]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def clean_cache(tmp_path_factory, teacher_dir, text_file) -> Path:
    out = tmp_path_factory.mktemp("faults_clean") / "cache"
    _build(build_argv(teacher_dir, text_file, out))
    return out


@pytest.fixture(scope="session")
def foreign_cache(tmp_path_factory, teacher_dir, other_text_file) -> Path:
    """Same teacher and shapes, another text: its shards are indistinguishable by layout."""
    out = tmp_path_factory.mktemp("faults_foreign") / "cache"
    _build(build_argv(teacher_dir, other_text_file, out))
    return out


@pytest.fixture(scope="session")
def other_settings_cache(tmp_path_factory, teacher_dir, text_file) -> Path:
    """Same text, other settings (top-k 4 instead of 8)."""
    out = tmp_path_factory.mktemp("faults_k4") / "cache"
    _build(build_argv(teacher_dir, text_file, out, "--top-k", "4"))
    return out


@pytest.fixture(scope="session")
def compact_cache(tmp_path_factory, teacher_dir, text_file) -> Path:
    """The reference build in the compact encoding (the reference cache is fp16)."""
    out = tmp_path_factory.mktemp("faults_compact") / "cache"
    _build(build_argv(teacher_dir, text_file, out, "--encoding", "compact"))
    return out


@pytest.fixture
def cache_copy(tmp_path, clean_cache) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    return out


@pytest.fixture
def build_args(teacher_dir, text_file):
    """`build_args(output, *extra)`: the argv of the reference build into `output`."""
    return lambda output, *extra: build_argv(teacher_dir, text_file, output, *extra)
