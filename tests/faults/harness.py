"""Tools of the fault suite: running the `cache_tools` CLI in this process or in a forked child (killed by an injected
fault, or under a file-size limit), checking the one-line error contract, and damaging a copy of a cache.

Forking the test process instead of starting `python -m cache_tools` saves the ~10 s of imports per killed build; the
child runs exactly the CLI entry point a user runs and dies by SIGKILL exactly as a separate process would."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from cache_tools.format import schema
from cache_tools.format.fsutil import file_sha256

# The one small cache every case starts from: ~5 shards of 4 windows of 32 tokens.
BUILD_FLAGS = ("--max-length", "32", "--top-k", "8", "--shard-size", "4", "--batch-size", "2", "--max-samples", "3",
               "--no-progress")


def build_argv(teacher_dir: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return ["build-cache", "--teacher", str(teacher_dir), "--dataset", str(dataset), "--output", str(output),
            *BUILD_FLAGS, *extra]


@dataclasses.dataclass
class Outcome:
    """How a command ended: exit code (None when killed), the killing signal, and its stderr lines."""

    code: int | None
    signal: int | None
    stderr: list[str]

    @property
    def error_line(self) -> str:
        return self.stderr[-1] if self.stderr else ""


def run_cli(argv: list[str], capsys) -> Outcome:
    """`cache_tools ARGV` in this process (the CLI's own error boundary decides the exit code)."""
    from cache_tools.cli import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return Outcome(code, None, _lines(captured.err))


def run_forked(argv: list[str], *, fault: str | None = None, fsize: int | None = None,
               before: Callable[[], None] | None = None, timeout: float | None = None) -> Outcome:
    """`cache_tools ARGV` in a forked child. `fault` sets DISTILL_FAULT; `fsize` caps the size of every file the child
    writes (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG the way a full disk fails them with ENOSPC)."""
    return wait_child(*start_forked(argv, fault=fault, fsize=fsize, before=before), timeout)


def start_forked(argv: list[str], *, fault: str | None = None, fsize: int | None = None,
                 before: Callable[[], None] | None = None) -> tuple[int, int]:
    """Start `run_forked`'s child and return (pid, read end of its stderr pipe) at once; `wait_child` collects it.
    stderr goes through a pipe, not a file: a pipe is not subject to the child's file-size limit."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: whatever happens, it ends in os._exit and never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            sys.stdout = sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
            # OpenMP (libgomp) cannot start a thread team in a forked child once the parent has used one: the
            # child hangs in gomp_team_barrier_wait (seen with OMP_NUM_THREADS=2 after other tests ran). One
            # intra-op thread keeps ATen and MKL out of OpenMP regions; the builds here are tiny anyway.
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(1)
            # A runner started in the background by a non-interactive shell inherits SIGINT *ignored* (and Python
            # then installs no KeyboardInterrupt handler): restore it, so a case's SIGINT acts like Ctrl-C.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if fault:
                os.environ["DISTILL_FAULT"] = fault
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
            if before is not None:
                before()
            from cache_tools.cli import main

            code = main(argv)
        except BaseException:  # noqa: BLE001 - report anything the CLI let escape, as a real process would
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def hold_after_manifest(ready: Path):
    """`before` hook for a forked build: once the unfinished manifest is saved, say so and wait (holding the lock)."""
    def before() -> None:
        from cache_tools import output_dir

        original = output_dir.save_tokenizer

        def save_and_wait(output, tokenizer):
            original(output, tokenizer)
            ready.write_text("ready")
            time.sleep(600)

        output_dir.save_tokenizer = save_and_wait
    return before


def wait_for(path: Path, pid: int | None = None) -> None:
    """Wait until `path` exists; with `pid`, fail at once if that child ended first (no clock: slow is not wrong)."""
    while not path.exists():
        if pid is not None and os.waitpid(pid, os.WNOHANG)[0]:
            raise AssertionError(f"{path} never appeared: the forked command ended before getting that far")
        time.sleep(0.05)


def wait_child(pid: int, read_fd: int, timeout: float | None) -> Outcome:
    """The child's outcome; `timeout` None (the default everywhere) waits as long as it runs, so a correct run on a
    loaded machine never fails for being slow."""
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks: list[bytes] = []
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], 0.05)
            if ready:
                block = os.read(pipe.fileno(), 1 << 16)
                if block:
                    chunks.append(block)
                    continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                while block := os.read(pipe.fileno(), 1 << 16):
                    chunks.append(block)
                break
            if deadline is not None and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"forked command did not end within {timeout}s")
    text = b"".join(chunks).decode("utf-8", errors="replace")
    if os.WIFSIGNALED(status):
        return Outcome(None, os.WTERMSIG(status), _lines(text))
    return Outcome(os.WEXITSTATUS(status), None, _lines(text))


def _lines(text: str) -> list[str]:
    # Progress bars and library chatter ("Loading weights", "Generating train split") are not messages of ours.
    noise = ("Loading weights", "Generating ", "Writing model", "[WARNING]", "Map", "Setting accelerator")
    return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith(noise)]


def assert_one_line_error(outcome: Outcome, command: str, *must_name: str) -> str:
    """The promised failure: exit 2, no traceback, the last stderr line is `cache_tools COMMAND: error: ...` naming
    every string in `must_name` (the file, the flag or the fix)."""
    text = "\n".join(outcome.stderr)
    assert outcome.code == 2, f"exit {outcome.code} (signal {outcome.signal}), stderr:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    line = outcome.error_line
    assert line.startswith(f"cache_tools {command}: error: "), text[-3000:]
    for name in must_name:
        assert name in line, f"{name!r} not in: {line}"
    return line


def folder_state(path: Path) -> dict[str, str]:
    """name -> sha256 of every file under `path` (to show a refused command changed nothing)."""
    return {str(p.relative_to(path)): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}


# -- damaging a cache --------------------------------------------------------------------------------------------
def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    path = cache / schema.MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_shard_consistently(cache: Path, index: int, dataset: str, edit: Callable[[np.ndarray], None]) -> None:
    """Change one dataset of a shard AND re-record its size + sha256 in the manifest and sidecar: a cache whose
    checksums are valid but whose numbers are wrong (a faulty builder or teacher), so only content checks can tell."""
    path = cache / schema.shard_name(index)
    with h5py.File(path, "r+") as f:
        values = f[dataset][...]
        edit(values)
        f[dataset][...] = values
    size, sha = path.stat().st_size, file_sha256(path)
    from cache_tools.format.windows import compute_shard_digest

    try:
        digest = compute_shard_digest(path)  # what a faulty builder would have recorded for the windows it wrote
    except schema.CacheError:
        digest = None  # a damaged window blob: the builder recorded the digest of the windows it meant to write

    def fix(record: dict) -> None:
        record["bytes"], record["sha256"] = size, sha
        if "windows_digest" in record and digest is not None:
            record["windows_digest"] = digest

    edit_manifest(cache, lambda m: [fix(s) for s in m["shards"] if s["index"] == index])
    sidecar = cache / schema.shard_sidecar_name(index)
    record = json.loads(sidecar.read_text(encoding="utf-8"))
    fix(record)
    sidecar.write_text(json.dumps(record), encoding="utf-8")
