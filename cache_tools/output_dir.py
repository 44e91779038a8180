"""Deciding what to do with an existing output folder (fresh / resume / refuse / overwrite) and recovering the
shards an interrupted build left behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from cache_tools import schema
from cache_tools.shard_io import read_attrs, write_sidecar
from cache_tools.teacher import BuildError

# Names a build writes: the manifest, shards, sidecars, and any *.tmp (temp files of all of them).
_OURS = re.compile(
    rf"^({re.escape(schema.MANIFEST_NAME)}|{schema.SHARD_PREFIX}\d+\.(h5|json))$|.*{re.escape(schema.TMP_SUFFIX)}$"
)
_OUR_DIRS = (schema.VOCAB_MAP_DIR, schema.TOKENIZER_DIR)


def _diff_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def plan_output(output: Path, manifest: schema.CacheManifest, *, resume: bool, overwrite: bool) -> str:
    """Read-only decision, identical on every rank: 'fresh', 'resume', 'done' (complete cache, same settings) or
    'overwrite'. Raises BuildError when the folder holds something we must not touch."""
    if not output.exists():
        return "fresh"
    if not output.is_dir():
        raise BuildError(f"--output {output}: exists and is not a folder; pick another --output")
    if overwrite:
        return "overwrite"
    entries = [p.name for p in output.iterdir()]
    foreign = [name for name in entries if not _OURS.match(name) and name not in _OUR_DIRS]
    if foreign:
        raise BuildError(f"--output {output}: folder holds files that are not a cache ({foreign[0]}, ...); pick an "
                         "empty folder or pass --overwrite")
    manifest_path = output / schema.MANIFEST_NAME
    if not manifest_path.is_file():
        leftovers = [name for name in entries if not name.endswith(schema.TMP_SUFFIX)]
        if leftovers:  # shards of unknown settings: keeping them could mix two teachers in one cache
            raise BuildError(f"--output {output}: holds cache files ({leftovers[0]}, ...) but no {schema.MANIFEST_NAME}"
                             "; pass --overwrite to rebuild or pick another --output")
        return "fresh"  # only temp files of a build killed before its first manifest: nothing to keep
    try:
        old = schema.CacheManifest.from_dict(json.loads(manifest_path.read_text(encoding="utf-8")), str(manifest_path))
    except json.JSONDecodeError as err:
        raise BuildError(f"{manifest_path}: unreadable ({err}); pass --overwrite to rebuild") from err
    differing = _diff_keys(old.settings(), manifest.settings())
    if differing:
        raise BuildError(f"--output {output}: holds a cache built with other settings ({', '.join(differing)}); pass "
                         "--overwrite to replace it or a new --output")
    if not resume:
        state = "complete" if old.complete else "incomplete"
        raise BuildError(f"--output {output}: already holds an {state} cache with these settings; pass --resume to "
                         "keep it or --overwrite to rebuild")
    if old.complete and all(_intact(output, shard) for shard in old.shards):
        return "done"
    return "resume"  # unfinished, or a finished cache with a shard deleted or truncated since: rebuild those


def _intact(output: Path, shard: schema.ShardInfo) -> bool:
    path = output / shard.file
    return path.is_file() and path.stat().st_size == shard.bytes


def clear_cache_files(output: Path, *, temp_only: bool) -> None:
    """Delete our own files (never anything else): temp files, or the whole cache for --overwrite."""
    if not output.is_dir():
        return
    for path in output.iterdir():
        if path.is_dir() and path.name.endswith(schema.TMP_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if path.is_dir() and not temp_only and path.name in _OUR_DIRS:
            shutil.rmtree(path, ignore_errors=True)
            continue
        if not path.is_file():
            continue
        if path.name.endswith(schema.TMP_SUFFIX) or (not temp_only and _OURS.match(path.name)):
            path.unlink(missing_ok=True)


def created_at(output: Path) -> str | None:
    """`created_at` of the manifest already in `output` (kept across resumes), if any."""
    try:
        return json.loads((output / schema.MANIFEST_NAME).read_text(encoding="utf-8")).get("created_at")
    except (OSError, json.JSONDecodeError):
        return None


def finished_shard(output: Path, index: int) -> schema.ShardInfo | None:
    """The ShardInfo of a finished shard (final name present), recomputing its sidecar when the build was killed
    between the rename and the sidecar write; None when the shard must be (re)built."""
    path = output / schema.shard_name(index)
    if not path.is_file():
        return None
    sidecar = output / schema.shard_sidecar_name(index)
    if sidecar.is_file():
        try:
            info = schema.ShardInfo(**json.loads(sidecar.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError):
            info = None  # recompute below
        if info is not None:
            if info.bytes == path.stat().st_size:
                return info
            # Truncated or replaced since it was finished: rebuild it.
            path.unlink()
            sidecar.unlink(missing_ok=True)
            return None
    attrs = read_attrs(path)
    info = schema.ShardInfo(
        file=path.name,
        index=int(attrs[schema.ATTR_SHARD_INDEX]),
        first_sequence=int(attrs[schema.ATTR_FIRST_SEQUENCE]),
        num_sequences=int(attrs[schema.ATTR_NUM_SEQUENCES]),
        num_tokens=int(attrs[schema.ATTR_NUM_TOKENS]),
        bytes=0,
        sha256="",
    )
    info.bytes = path.stat().st_size
    info.sha256 = schema.file_sha256(path)
    write_sidecar(output, info)
    return info


def save_tokenizer(output: Path, tokenizer) -> None:
    """Save the teacher tokenizer into `output/tokenizer/` (temp folder + rename), so readers of the cache need
    neither the teacher's path nor the network. Kept as is when a resumed build finds it already there."""
    target = output / schema.TOKENIZER_DIR
    if target.is_dir():
        return
    tmp = output / (schema.TOKENIZER_DIR + schema.TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
