"""The output folder of a build: the lock that keeps a second build out, deciding what to do with what is already
there (fresh / resume / done / refuse / overwrite), and deciding which finished shards a resume may keep.

Trust rule of --resume: a shard is kept only if its bytes match (size + sha256) a record written by THIS build: its
sidecar carrying this build's `build_id`, or the shard's entry in this build's manifest. The build id starts with a
hash of the build's settings, so after the manifest was lost (deleted, truncated) the sidecars alone say which shards
were written with the settings of the current command. A shard copied from another cache (with or without its
sidecar), a shard with other settings, and a shard changed on disk since it was finished are discarded (one line each
on stderr) and rebuilt: a resume never keeps data it cannot vouch for."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from cache_tools.format import schema
from cache_tools.format.errors import BuildError, UserError, describe_os_error
from cache_tools.format.shard_io import write_sidecar
from cache_tools.format.verify import verify_cache, verify_shard

LOCK_NAME = ".build-cache.lock"  # exists (and is flock-ed) only while a build runs
_SHARD = re.compile(rf"^{re.escape(schema.SHARD_PREFIX)}(\d+)\.(h5|json)$")
# Names a build writes: the manifest, shards, sidecars, the lock, and any *.tmp (temp files of all of them).
_OURS = re.compile(
    rf"^({re.escape(schema.MANIFEST_NAME)}|{re.escape(LOCK_NAME)}|{schema.SHARD_PREFIX}\d+\.(h5|json))$"
    rf"|.*{re.escape(schema.TMP_SUFFIX)}$"
)
# Folders a build writes, or that student-side tools derive from this cache and keep beside it.
_OUR_DIRS = (schema.VOCAB_MAP_DIR, schema.TOKENIZER_DIR, schema.XTOK_STORE_DIR)


def _say(message: str) -> None:
    print(f"cache_tools: {message}", file=sys.stderr, flush=True)


class BuildLock:
    """Advisory lock (`fcntl.flock`) on `output/LOCK_NAME`, held from before the folder is inspected until the build
    ends, so a second build on the same folder (with or without --resume) refuses at once instead of both writing.
    The holder's pid is written into the file for the message. The lock dies with its process (even on SIGKILL); the
    file is removed on release while still locked, and a locker that finds its file unlinked retries, so two builds
    can never hold locks on two different files of the same name."""

    def __init__(self, output: Path) -> None:
        if output.exists() and not output.is_dir():
            raise BuildError(f"--output {output}: exists and is not a folder; pick another --output")
        self.output, self.path, self._fd = output, output / LOCK_NAME, -1
        self.created = not output.exists()
        try:
            output.mkdir(parents=True, exist_ok=True)
            while not self._try_lock():
                pass
        except OSError as err:
            raise UserError(describe_os_error(err, f"--output {output}: locking the output folder")) from err

    def _try_lock(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise BuildError(f"--output {self.output}: another build (pid {holder}) is writing this folder; wait "
                                 "for it to finish (then --resume if it did not) or pick another --output") from err
            # No lock support (some network filesystems): build without one rather than refuse.
            _say(f"{self.path}: cannot lock ({err.strerror}); make sure no other build uses this folder")
            return True
        if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        """Remove the lock file (still locked, see above) and unlock; a folder this lock created and nothing else
        wrote to is removed again (nothing left behind by a build refused at its start)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = -1
        if self.created:
            with contextlib.suppress(OSError):
                self.output.rmdir()  # only succeeds when empty


def settings_key(manifest: schema.CacheManifest) -> str:
    return manifest.settings_key()


def _read_manifest(output: Path) -> schema.CacheManifest | None:
    """The manifest in `output`, or None when it is missing, unreadable, of an unreadable version or lacks a key
    (then only the sidecars count: they say which shards this build's settings wrote)."""
    path = output / schema.MANIFEST_NAME
    try:
        return schema.CacheManifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (OSError, ValueError, schema.CacheError):
        return None


def _diff_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def plan_output(output: Path, manifest: schema.CacheManifest, *, resume: bool, overwrite: bool) -> str:
    """Read-only decision, identical on every rank: 'fresh', 'resume', 'done' (complete cache, same settings, every
    shard byte-identical to its record) or 'overwrite'. Raises BuildError when the folder holds something we must not
    touch, naming the flag that resolves it (each suggested flag leads somewhere: none sends the user back here)."""
    if output.exists() and not output.is_dir():
        raise BuildError(f"--output {output}: exists and is not a folder; pick another --output")
    if not output.exists():
        return "fresh"
    if overwrite:
        return "overwrite"
    entries = [p.name for p in output.iterdir()]
    foreign = [name for name in entries if not _OURS.match(name) and name not in _OUR_DIRS]
    if foreign:
        raise BuildError(f"--output {output}: folder holds files that are not a cache ({foreign[0]}, ...); pick an "
                         "empty folder or pass --overwrite")
    manifest_path = output / schema.MANIFEST_NAME
    shard_files = sorted(name for name in entries if _SHARD.match(name))
    old = _read_manifest(output) if manifest_path.is_file() else None
    if old is None:
        if not shard_files:
            return "fresh"  # only temp files (a build killed before its first manifest) and folders we rewrite
        state = "is unreadable" if manifest_path.is_file() else "is missing"
        if resume:
            return "resume"  # start_build rebuilds the manifest from the sidecars
        raise BuildError(f"{manifest_path} {state} but the folder holds shards ({shard_files[0]}, ...); pass --resume "
                         "to keep the intact shards of these settings (the manifest is rebuilt from their sidecars) "
                         "or --overwrite to start over")
    differing = _diff_keys(old.settings(), manifest.settings())
    if differing:
        raise BuildError(f"--output {output}: holds a cache built with other settings ({', '.join(differing)}); pass "
                         "--overwrite to replace it or a new --output")
    if not resume:
        state = "a complete" if old.complete else "an incomplete"
        raise BuildError(f"--output {output}: already holds {state} cache with these settings; pass --resume to "
                         "keep it or --overwrite to rebuild")
    listed = {s.file for s in old.shards}
    extra = [name for name in shard_files if name.endswith(".h5") and name not in listed]
    if old.complete and not extra and not verify_cache(output):  # checksums AND contents: never keep bad data
        return "done"
    return "resume"  # unfinished, or a finished cache with a shard deleted, damaged or added since: repair it


def clear_cache_files(output: Path, *, temp_only: bool) -> None:
    """Delete our own files (never anything else, never the lock): temp files, or the whole cache for --overwrite."""
    if not output.is_dir():
        return
    for path in output.iterdir():
        if path.is_dir() and path.name.endswith(schema.TMP_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if path.is_dir() and not temp_only and path.name in _OUR_DIRS:
            shutil.rmtree(path, ignore_errors=True)
            continue
        if not path.is_file() or path.name == LOCK_NAME:
            continue
        if path.name.endswith(schema.TMP_SUFFIX) or (not temp_only and _OURS.match(path.name)):
            path.unlink(missing_ok=True)


def _read_sidecar(path: Path) -> tuple[schema.ShardInfo, str] | None:
    """(the shard's record, the id of the build that wrote it) from a sidecar; None when unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        build_id = data.pop("build_id", "")
        return schema.ShardInfo(**data), str(build_id)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _sidecars(output: Path) -> dict[int, tuple[schema.ShardInfo, str] | None]:
    return {int(m.group(1)): _read_sidecar(output / m.group(0))
            for m in map(_SHARD.match, sorted(os.listdir(output))) if m and m.group(2) == "json"}


def _pick_build_id(output: Path, old: schema.CacheManifest | None, key: str) -> str:
    """This build's id: the previous run's (manifest, else the commonest among sidecars of these settings), or new."""
    if old is not None and old.build_id.startswith(key + "-"):
        return old.build_id
    ids = collections.Counter(s[1] for s in _sidecars(output).values() if s and s[1].startswith(key + "-"))
    return ids.most_common(1)[0][0] if ids else f"{key}-{uuid.uuid4().hex[:16]}"


def _screen(output: Path, manifest: schema.CacheManifest, records: dict[int, schema.ShardInfo]) -> None:
    """Keep each shard only if it matches a record of this build and passes `verify`'s content checks (a shard
    written by a faulty earlier run must not survive a resume); discard (and say so) every other one."""
    build_id, shard_size = manifest.build_id, manifest.shard_size
    sidecars = _sidecars(output)
    for name in sorted(os.listdir(output)):
        m = _SHARD.match(name)
        if not m or m.group(2) != "h5":
            continue
        index, path = int(m.group(1)), output / name
        side = sidecars.get(index)
        ours = side[0] if side is not None and side[1] == build_id else None
        record = ours or records.get(index)
        if record is None:
            reason = "not written by this build (copied from another cache, or built with other settings)"
        elif record.file != name or record.index != index or record.first_sequence != index * shard_size:
            reason = f"its record describes {record.file} (sequence {record.first_sequence}), not this shard"
        elif faults := verify_shard(output, manifest, record):  # size + sha256 against the record, then contents
            reason = f"differs from what this build recorded or fails verification ({faults[0].split(';')[0]})"
        else:
            if ours is None:  # a record of the manifest only: give the shard this build's sidecar
                write_sidecar(output, record, build_id)
            continue
        _say(f"{path}: {reason}; discarding it, --resume rebuilds it")
        path.unlink()
        (output / schema.shard_sidecar_name(index)).unlink(missing_ok=True)
    for index in sidecars:  # sidecars whose shard is gone describe nothing
        if not (output / schema.shard_name(index)).is_file():
            (output / schema.shard_sidecar_name(index)).unlink(missing_ok=True)


def start_build(output: Path, manifest: schema.CacheManifest, plan: str) -> None:
    """Rank 0, after `plan_output`: clear temp files (or everything for 'overwrite'), fix this build's id (kept
    across resumes), keep only the shards this build can vouch for, and save the unfinished manifest."""
    clear_cache_files(output, temp_only=plan != "overwrite")
    old = _read_manifest(output) if plan == "resume" else None
    if plan == "resume" and old is None:
        _say(f"{output / schema.MANIFEST_NAME} is missing or unreadable; rebuilding it from the shards' sidecars")
    if old is not None and _diff_keys(old.settings(), manifest.settings()):
        old = None  # plan_output refused other settings; an unreadable-then-recovered manifest lands here
    manifest.created_at = (old.created_at if old else "") or datetime.now(timezone.utc).isoformat()
    manifest.build_id = _pick_build_id(output, old, settings_key(manifest)) if plan == "resume" else \
        f"{settings_key(manifest)}-{uuid.uuid4().hex[:16]}"
    if plan == "resume":
        _screen(output, manifest, {s.index: s for s in old.shards} if old else {})
    manifest.save(output)  # complete=false: a partial folder records its settings and build id


def finished_shard(output: Path, index: int, build_id: str) -> schema.ShardInfo | None:
    """The ShardInfo of a shard this build finished (screened at start, or written since), else None."""
    side = _read_sidecar(output / schema.shard_sidecar_name(index))
    path = output / schema.shard_name(index)
    if side is None or side[1] != build_id or not path.is_file() or path.stat().st_size != side[0].bytes:
        return None
    return side[0]


def save_tokenizer(output: Path, tokenizer) -> None:
    """Save the teacher tokenizer into `output/tokenizer/` (temp folder + rename), so readers of the cache need
    neither the teacher's path nor the network. Kept as is when a resumed build finds it already there."""
    target = output / schema.TOKENIZER_DIR
    if target.is_dir():
        return
    tmp = output / (schema.TOKENIZER_DIR + schema.TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except Exception as err:  # disk full / quota: one line, and no half-saved tokenizer left behind
        shutil.rmtree(tmp, ignore_errors=True)
        # The Rust `tokenizers` library reports I/O failures as a plain Exception "... (os error 28)".
        code = err.errno if isinstance(err, OSError) else _rust_os_errno(str(err))
        if code is None:
            raise
        raise UserError(describe_os_error(OSError(code, os.strerror(code), str(tmp)), "saving the tokenizer")) from err


def _rust_os_errno(message: str) -> int | None:
    found = re.search(r"\(os error (\d+)\)", message)
    return int(found.group(1)) if found else None
