"""The one error convention of both command lines (`cache_tools`, `python -m distill.*`).

Expected failures (bad input, a damaged cache, a full disk) raise a `UserError` subclass whose message is ONE line
naming the file or flag and the fix; `run_cli` prints it as ``PROG: error: MESSAGE`` and exits 2. Anything else is a
bug: the traceback is kept and one line says what to report. Both sides import this module (the student side may
import the teacher side, never the reverse)."""

from __future__ import annotations

import errno
import re
import sys
import traceback
from collections.abc import Callable

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
REPORT_HINT = "this is a bug: please report it with the command line and the traceback above"


class UserError(Exception):
    """A failure the user can fix. `str(err)` is one line naming the file/flag and the fix."""


# Every expected failure of either side is one of these; `run_cli` needs no list of them.


class CacheError(UserError):
    """A problem with a cache directory or its contents. The message is one line naming the file and the fix."""


class CacheMismatchError(CacheError):
    """Caches used together (several teachers) that do not cover the same windows; names both caches."""


class CodecError(UserError, ValueError):
    """A blob that cannot be decoded (truncated, corrupt, or not what the caller said it holds)."""


class BuildError(UserError):
    """Bad input to a build: a one-line message naming the flag/file and the fix."""


class DatasetInputError(UserError):
    """Bad dataset input: one line naming the file (and line) and the fix."""


class ConfigError(UserError, ValueError):
    """A bad training configuration; the message names the key(s) and the fix."""


class UsageError(UserError):
    """A command line argparse cannot take (an unknown or abbreviated flag, a bad value): one line, the fix."""


class TokenizerError(UserError, ValueError):
    """A tokenizer cannot be used (e.g. for cross-tokenizer distillation). One line naming it and the fix."""


class NonFiniteLogits(UserError):
    """Some rows' logits hold NaN or +inf (or are all -inf), so they define no distribution. `rows` are the row
    indices in the caller's input; the builder turns them into global sequence indices for its message."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows
        super().__init__(f"non-finite teacher logits in {len(rows)} row(s), first {rows[:5]}")


class NonFiniteLossError(UserError):
    """Too many non-finite training losses in a row."""


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, file-size limit, quota). One line naming the folder and fix."""


# How libraries that wrap the OS error in their own type (safetensors' Rust writer, torch's zip writer) word a full
# disk: "No space left on device (os error 28)", "File too large (os error 27)", "Disk quota exceeded".
_DISK_FULL = re.compile(r"no space left on device|file too large|disk quota exceeded|os error (?:27|28|122)\b",
                        re.IGNORECASE)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_reason(err: BaseException) -> str | None:
    """The reason text when `err` (or an error it was raised from) is a full disk / file-size limit / quota, else
    None. Recognises OSError by errno and the wrapped forms other libraries raise by their message."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            return err.strerror or one_line(err)
        match = _DISK_FULL.search(str(err))
        if match:
            return match.group(0)
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException | str) -> str:
    """The last non-empty line of an error message (library errors often put the cause last). An error re-raised
    from a DataLoader worker carries the worker's traceback: its last line is `module.Type: message`; keep the
    message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    head, sep, rest = lines[-1].partition(": ")
    from_worker = sep and len(lines) > 1 and "Traceback" in str(err) and head.split(".")[-1].isidentifier()
    return rest if from_worker else lines[-1]


def describe_os_error(err: OSError, action: str = "") -> str:
    """One line for an OS error: what failed, on which file, and the usual fix."""
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    what = f"{action} failed: " if action else ""
    reason = err.strerror or one_line(err)
    if err.errno in _DISK_ERRNOS:
        fix = "free disk space (or raise the file-size limit), then rerun with --resume"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable folder or fix its permissions"
    else:
        fix = "check the path and free space"
    return f"{where}{what}{reason}; {fix}"


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


def run_cli(prog: str, body: Callable[[], int], *, interrupted_hint: str = "") -> int:
    """Run a command's body inside the error boundary and return its exit status.

    - `UserError`: one line on stderr, exit 2.
    - `OSError` (disk full, permissions, a path that is a file): one line via `describe_os_error`, exit 2.
    - KeyboardInterrupt: one line (+ `interrupted_hint`), exit 130.
    - Anything else: the traceback, then one line saying it is a bug to report; exit 1.
    """
    try:
        return body()
    except UserError as err:
        print_error(prog, str(err))
        return EXIT_BAD_INPUT
    except OSError as err:
        print_error(prog, describe_os_error(err))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted_hint if interrupted_hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the boundary: keep the traceback, add what to do
        reason = disk_full_reason(err)
        if reason is not None:  # a library's own error type around a full disk: still the user's to fix
            print_error(prog, f"{reason}: a write failed because the disk is full or a size limit was reached; "
                              "free disk space, then rerun")
            return EXIT_BAD_INPUT
        traceback.print_exc()
        print(f"{prog}: internal error: {REPORT_HINT}", file=sys.stderr, flush=True)
        return 1
