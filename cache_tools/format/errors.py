"""The one error convention of both command lines (`cache_tools`, `python -m distill.*`).

Expected failures (bad input, a damaged cache, a full disk) raise a `UserError` subclass whose message is ONE line
naming the file or flag and the fix; `run_cli` prints it as ``PROG: error: MESSAGE`` and exits 2. Anything else is a
bug: the traceback is kept and one line says what to report. Both sides import this module (the student side may
import the teacher side, never the reverse)."""

from __future__ import annotations

import errno
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


class CodecError(UserError, ValueError):
    """A blob that cannot be decoded (truncated, corrupt, or not what the caller said it holds)."""


class BuildError(UserError):
    """Bad input to a build: a one-line message naming the flag/file and the fix."""


class DatasetInputError(UserError):
    """Bad dataset input: one line naming the file (and line) and the fix."""


class ConfigError(UserError, ValueError):
    """A bad training configuration; the message names the key(s) and the fix."""


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
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
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
    except Exception:  # noqa: BLE001 - the boundary: keep the traceback, add what to do
        traceback.print_exc()
        print(f"{prog}: internal error: {REPORT_HINT}", file=sys.stderr, flush=True)
        return 1
