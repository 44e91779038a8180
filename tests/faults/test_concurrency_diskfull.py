"""Two builds on one folder (the build lock), and a full disk (RLIMIT_FSIZE in a forked child: writes past the limit
fail with EFBIG exactly where a full disk fails them with ENOSPC)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from cache_testing import assert_same_cache

from cache_tools.format import schema
from faults.harness import (
    assert_one_line_error,
    hold_after_manifest,
    run_cli,
    run_forked,
    start_forked,
    wait_child,
    wait_for,
)

pytestmark = pytest.mark.faults


def test_second_build_refused_while_first_runs(tmp_path, clean_cache, build_args, capsys):
    out, ready = tmp_path / "cache", tmp_path / "ready"
    pid, log = start_forked(build_args(out), before=hold_after_manifest(ready))
    try:
        wait_for(ready, pid)
        before = sorted(p.name for p in out.iterdir())
        for extra in ((), ("--resume",), ("--overwrite",)):  # following any advice must not break the running build
            outcome = run_cli(build_args(out, *extra), capsys)
            assert_one_line_error(outcome, "build-cache", str(out), f"pid {pid}", "another build")
        assert sorted(p.name for p in out.iterdir()) == before, "a refused build touched the folder"
    finally:
        os.kill(pid, signal.SIGKILL)  # the first build dies holding the lock: the lock dies with it
        assert wait_child(pid, log, None).signal == signal.SIGKILL
    assert run_cli(build_args(out, "--resume"), capsys).code == 0
    assert_same_cache(clean_cache, out)
    assert not (out / ".build-cache.lock").exists()


def test_lock_refuses_in_process_and_releases(tmp_path):
    from cache_tools.format.errors import BuildError
    from cache_tools.output_dir import BuildLock

    first = BuildLock(tmp_path / "c")
    with pytest.raises(BuildError, match=rf"another build \(pid {os.getpid()}\)"):
        BuildLock(tmp_path / "c")
    first.release()
    assert not (tmp_path / "c").exists(), "a lock that created the folder and wrote nothing removes it again"
    BuildLock(tmp_path / "c").release()


def _limit(where: str, clean: Path) -> int:
    """A file-size limit that fails the build at `where`, from the sizes of the reference cache's files."""
    tokenizer = (clean / schema.TOKENIZER_DIR / "tokenizer.json").stat().st_size
    shard = (clean / schema.shard_name(0)).stat().st_size
    manifest_start = 4096  # the unfinished manifest (no shard list) is ~1.5 kB
    assert manifest_start < tokenizer < shard - 2048, "sizes changed: pick the limits anew"
    return {"tokenizer": max(manifest_start, tokenizer // 2), "shard_write": (tokenizer + shard) // 2,
            "shard_close": shard - 256}[where]


@pytest.mark.parametrize(("where", "names"), [
    ("tokenizer", (schema.TOKENIZER_DIR, "saving the tokenizer", "--resume")),
    ("shard_write", (schema.shard_name(0), "File too large", "--resume")),
    ("shard_close", (schema.shard_name(0), "File too large", "--resume")),  # HDF5 fails in its final flush
])
def test_disk_full_is_one_line_and_resumable(where, names, tmp_path, clean_cache, build_args, capsys):
    out = tmp_path / "cache"
    outcome = run_forked(build_args(out), fsize=_limit(where, clean_cache))
    assert outcome.signal is None, f"killed by signal {outcome.signal} (SIGSEGV/SIGBUS = the h5py crash)"
    assert_one_line_error(outcome, "build-cache", *names)
    assert not [p.name for p in out.iterdir() if p.name.endswith(schema.TMP_SUFFIX)], "temp files left behind"
    assert not schema.load_manifest(out).complete
    assert run_cli(build_args(out, "--resume"), capsys).code == 0  # space freed: the same command resumes
    assert_same_cache(clean_cache, out)


def test_disk_full_before_anything_leaves_nothing(tmp_path, build_args):
    """The very first write (the manifest) fails: one line naming it, and no folder is left behind."""
    out = tmp_path / "cache"
    outcome = run_forked(build_args(out), fsize=200)
    assert outcome.code == 2 and "Traceback" not in "\n".join(outcome.stderr)
    assert schema.MANIFEST_NAME in outcome.error_line and "File too large" in outcome.error_line
    assert not out.exists()


def test_output_is_a_file(tmp_path, build_args, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    outcome = run_cli(build_args(blocker), capsys)
    assert_one_line_error(outcome, "build-cache", str(blocker), "not a folder")
    assert blocker.read_text() == "mine"
