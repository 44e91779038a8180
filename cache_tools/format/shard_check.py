"""Whole-shard checksums on the read path: before a process first reads a shard, its size and sha256 are checked
against the manifest, so a shard damaged on disk (even with its size unchanged) is refused with one line instead of
being trained on. `cache_tools verify` / `--verify_cache` stay the up-front check of the numbers themselves.

Hashing a shard costs a full read of it, so a successful check is remembered by the shard's (size, mtime, inode):
in the process (every later read only `stat`s the file) and in a small record per shard under the user's cache
folder (`$DISTILL_VERIFIED_DIR`, else `$XDG_CACHE_HOME/distill-cache/verified`, else `~/.cache/...`), so the
DataLoader workers of later epochs and runs do not hash it again. Writing a shard changes its mtime, so a changed
shard is hashed again; damage that bypasses the file system (a failing disk) is caught by `cache_tools verify`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from cache_tools.format.errors import CacheError
from cache_tools.format.fsutil import atomic_write_text, file_sha256
from cache_tools.format.manifest import ShardInfo

RECORD_ENV = "DISTILL_VERIFIED_DIR"


def record_dir() -> Path:
    if os.environ.get(RECORD_ENV):
        return Path(os.environ[RECORD_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distill-cache" / "verified"


class ShardChecksums:
    """`check(shard)` raises a one-line CacheError unless `cache_dir/shard.file` has the manifest's size and sha256.
    Fork- and pickle-safe: what the parent verified stays verified in its DataLoader workers."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self._verified: dict[str, tuple[int, int, int]] = {}  # shard file -> (size, mtime_ns, inode) verified

    def check(self, shard: ShardInfo) -> None:
        path = self.cache_dir / shard.file
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(shard.file) == key:
            return
        if st.st_size != shard.bytes:
            raise CacheError(f"{path}: {st.st_size} bytes, the manifest says {shard.bytes} (truncated or replaced); "
                             "run `cache_tools verify` and rebuild it with `cache_tools build-cache --resume`")
        record = record_dir() / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
        want = {"path": str(path.resolve()), "size": key[0], "mtime_ns": key[1], "inode": key[2],
                "sha256": shard.sha256}
        if _read_record(record) != want:
            if file_sha256(path) != shard.sha256:
                raise CacheError(f"{path}: sha256 does not match the manifest (corrupted on disk since it was "
                                 "built); run `cache_tools verify` and rebuild it with `cache_tools build-cache "
                                 "--resume`")
            with contextlib.suppress(OSError):  # a read-only home: every process hashes for itself
                record.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(record, json.dumps(want))
        self._verified[shard.file] = key


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
