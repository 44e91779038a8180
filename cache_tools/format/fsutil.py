"""Small filesystem helpers used by both sides: atomic writes (temp file + fsync + rename), checksums, and the
offline environment for subprocesses. Readers of a path written here see the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from cache_tools.format.faults import fault_point

TMP_SUFFIX = ".tmp"

# Environment that keeps transformers / datasets / hub clients off the network (tests, demo, benchmarks).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def temp_path_for(path: str | os.PathLike, suffix: str = "") -> Path:
    """A sibling temp name for `path`, unique per process; ends in `TMP_SUFFIX` (+ `suffix`, e.g. ".npz" for numpy,
    which appends its own extension otherwise) so a build's clean-up recognises it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}{suffix}")


def fsync_path(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to (a file or a folder); on success it is renamed over `path`
    (a folder replaces the old folder); on error it is removed and `path` is untouched."""
    path = Path(path)
    tmp = temp_path_for(path, suffix)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            fsync_path(tmp)
        fault_point(f"write:{path.name}")
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError) and not err.filename:  # a failed write() names no file: name the one we write
            err.filename = str(path)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (temp + fsync + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
