"""Kill a build with SIGKILL at every injected point (`DISTILL_FAULT`, cache_tools/format/faults.py), then run the same
command with --resume: the result must be byte-identical to a clean build, and nothing temporary may be left."""

from __future__ import annotations

import os
import signal

import pytest
from cache_testing import assert_same_cache

from cache_tools.format import schema
from faults.harness import hold_after_manifest, run_cli, run_forked, start_forked, wait_child, wait_for

pytestmark = pytest.mark.faults

# (point, why it matters). The reference cache has 5 shards of 2 batches each.
FAST_POINTS = [
    "shard.rename@2",  # the second shard is complete in its *.tmp, not yet in place
    "write:manifest.json@2",  # the final manifest is written but not renamed: every shard is in place
]
FULL_POINTS = [
    "shard.mid@1",  # half of the first shard appended
    "shard.mid@4",  # half of the second shard
    "shard.closed@1",  # HDF5 file closed, not yet fsynced or renamed
    "shard.rename@1",
    "shard.rename@5",  # the last shard
    "shard.renamed@2",  # renamed, but its sidecar not written: the shard cannot be vouched for, so it is rebuilt
    "shard.sidecar@3",
    "write:manifest.json@1",  # the first (unfinished) manifest: the folder holds nothing but temp files
    "write:shard-00002.json@1",  # inside the sidecar's atomic write
]


def _kill_then_resume(point: str, out, clean_cache, build_args, capsys) -> None:
    killed = run_forked(build_args(out), fault=point)
    assert killed.signal == signal.SIGKILL, f"{point} never fired: exit {killed.code}\n" + "\n".join(killed.stderr)
    resumed = run_cli(build_args(out, "--resume"), capsys)
    assert resumed.code == 0, "\n".join(resumed.stderr)
    assert_same_cache(clean_cache, out)
    assert not [p.name for p in out.iterdir() if p.name.endswith(schema.TMP_SUFFIX) or p.name.startswith(".")]


@pytest.mark.parametrize("point", FAST_POINTS)
def test_kill_and_resume(point, tmp_path, clean_cache, build_args, capsys):
    _kill_then_resume(point, tmp_path / "cache", clean_cache, build_args, capsys)


@pytest.mark.faults_full
@pytest.mark.parametrize("point", FULL_POINTS)
def test_kill_and_resume_full(point, tmp_path, clean_cache, build_args, capsys):
    _kill_then_resume(point, tmp_path / "cache", clean_cache, build_args, capsys)


@pytest.mark.faults_full
def test_resume_killed_again(tmp_path, clean_cache, build_args, capsys):
    """Killed, resumed, the resume killed too: the second resume still ends byte-identical."""
    out = tmp_path / "cache"
    assert run_forked(build_args(out), fault="shard.rename@2").signal == signal.SIGKILL
    assert run_forked(build_args(out, "--resume"), fault="shard.mid@2").signal == signal.SIGKILL
    assert run_cli(build_args(out, "--resume"), capsys).code == 0
    assert_same_cache(clean_cache, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_build_resumes(sig, tmp_path, clean_cache, build_args, capsys):
    """Ctrl-C: one line and exit 130; SIGTERM (a scheduler's stop): the default action. Either way the lock is gone
    and --resume ends byte-identical."""
    out, ready = tmp_path / "cache", tmp_path / "ready"
    pid, pipe = start_forked(build_args(out), before=hold_after_manifest(ready))
    wait_for(ready, pid)
    os.kill(pid, sig)
    stopped = wait_child(pid, pipe, None)
    if sig == signal.SIGINT:
        assert stopped.code == 130 and stopped.error_line.startswith("cache_tools build-cache: interrupted"), stopped
        assert "--resume" in stopped.error_line and "Traceback" not in "\n".join(stopped.stderr)
    else:
        assert stopped.signal == signal.SIGTERM
    assert run_cli(build_args(out, "--resume"), capsys).code == 0
    assert_same_cache(clean_cache, out)


def test_killed_build_is_reported_by_verify_and_reader(tmp_path, build_args, capsys):
    """A killed build's folder is not mistaken for a cache: verify exits 2 naming the fix, the reader refuses."""
    from cache_tools.format.reader import TeacherCacheReader

    out = tmp_path / "cache"
    assert run_forked(build_args(out), fault="shard.rename@3").signal == signal.SIGKILL
    outcome = run_cli(["verify", str(out)], capsys)
    assert outcome.code == 2 and "incomplete" in outcome.stderr[0] and "--resume" in outcome.stderr[0]
    with pytest.raises(schema.CacheError, match="incomplete.*--resume"):
        TeacherCacheReader(out)
    plain = run_cli(build_args(out), capsys)  # the same command without --resume says what to pass
    assert plain.code == 2 and "--resume" in plain.error_line


def test_fault_point_parsing(monkeypatch):
    """`name@N` fires at the N-th hit only; other names and no variable are no-ops."""
    from cache_tools.format import faults

    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    faults.fault_point("a.b")
    monkeypatch.setenv(faults.ENV_VAR, "a.b@3")
    for _ in range(5):
        faults.fault_point("a.b")
        faults.fault_point("other")
    assert kills == [signal.SIGKILL]
    monkeypatch.setenv(faults.ENV_VAR, "write:x@y.json")  # an '@' that is no count belongs to the name
    faults.fault_point("write:x@y.json")
    assert kills == [signal.SIGKILL] * 2
