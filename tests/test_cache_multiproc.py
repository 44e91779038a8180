"""Real processes: `python -m cache_tools` single-process reference, a 2-rank `torchrun` build, and a build killed with
SIGKILL after its first shard, then resumed. All must produce byte-identical caches."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_testing import assert_same_cache, cli_command, subprocess_env

from cache_tools.format import schema

pytestmark = pytest.mark.slow


def _build_args(teacher_dir, text_file, output, *extra) -> list[str]:
    return ["build-cache", "--teacher", teacher_dir, "--dataset", text_file, "--output", output, "--max-length", "32",
            "--top-k", "8", "--shard-size", "3", "--batch-size", "1", "--max-samples", "30", "--no-progress", *extra]


def _run(cmd: list[str], timeout: float | None = None) -> None:
    """Run in its own session so a timeout (none by default: a slow correct run must not fail) can kill the launcher
    AND its workers (no orphans left behind)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, text_file) -> Path:
    out = tmp_path_factory.mktemp("mp") / "single"
    _run(cli_command(*_build_args(teacher_dir, text_file, out)))
    return out


def test_torchrun_two_ranks_equals_single_process(reference, teacher_dir, text_file, tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cache_tools", *_build_args(teacher_dir, text_file, out)]
    _run(cmd)
    assert schema.load_manifest(out).complete
    assert len(schema.load_manifest(out).shards) >= 4  # both ranks had work
    assert_same_cache(reference, out)


def test_kill_9_then_resume_equals_clean_build(reference, teacher_dir, text_file, tmp_path):
    out = tmp_path / "killed"
    # Batch size 1 (in every run here: HDF5 file bytes depend on the write pattern) keeps the build long enough to
    # be killed part-way on any machine.
    args = _build_args(teacher_dir, text_file, out)
    proc = subprocess.Popen(cli_command(*args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    first_shard = out / schema.shard_name(0)
    while not first_shard.exists() and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert first_shard.exists(), "the build never produced a shard"
    assert not schema.load_manifest(out).complete, "the build finished before it could be killed"
    _run(cli_command(*_build_args(teacher_dir, text_file, out, "--resume")))
    assert not list(out.glob("*" + schema.TMP_SUFFIX))
    assert_same_cache(reference, out)
    # A resumed run that changed nothing that matters is indistinguishable from a clean one: verify passes too.
    _run(cli_command("verify", out))
