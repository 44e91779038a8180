"""`cache_tools inspect`: a summary of a cache directory (text or JSON): targets kind / encoding, bytes per token
split by dataset (measured on the shards), and the state of every shard (present, size as recorded, readable)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema, shard_io


def _shard_storage(cache_dir: Path, m: schema.CacheManifest) -> tuple[dict[str, int], list[str]]:
    """Bytes per dataset summed over the shards, and one line per missing / resized / unreadable shard."""
    per_dataset = dict.fromkeys(schema.dataset_names(m), 0)
    problems = []
    for shard in m.shards:
        path = cache_dir / shard.file
        if not path.is_file():
            problems.append(f"{shard.file}: missing")
            continue
        if path.stat().st_size != shard.bytes:
            problems.append(f"{shard.file}: {path.stat().st_size} bytes, manifest says {shard.bytes}")
            continue
        try:
            with shard_io.open_shard(path) as f:
                for name, size in shard_io.storage_bytes(f, m).items():
                    per_dataset[name] += size
        except (OSError, KeyError, schema.CacheError) as err:
            problems.append(f"{shard.file}: unreadable ({type(err).__name__})")
    return per_dataset, problems


def _positions_with_targets(cache_dir: Path, m: schema.CacheManifest) -> str:
    """'X of N (p%)': the positions that store teacher targets (assistant-only caches skip prompt positions, whose
    targets are never used; what that saves per token is in docs/RESULTS.md)."""
    if not m.targets.assistant_only:
        return f"{m.num_tokens} of {m.num_tokens} (all)"
    stored = 0
    for shard in m.shards:
        try:
            with shard_io.open_shard(cache_dir / shard.file) as f:
                stored += int(f[schema.TARGET_MASK][:].astype(np.int64).sum())
        except (OSError, KeyError, schema.CacheError):
            return "unknown (a shard is unreadable)"
    return f"{stored} of {m.num_tokens} ({100 * stored / max(1, m.num_tokens):.1f}%, assistant-only)"


def cache_summary(cache_dir: str | Path) -> dict[str, Any]:
    m = schema.load_manifest(cache_dir)
    total_bytes = sum(s.bytes for s in m.shards)
    per_dataset, problems = _shard_storage(Path(cache_dir), m)
    tokens = max(m.num_tokens, 1)
    if not m.complete:
        state = "incomplete (build not finished; rerun build-cache --resume)"
    elif problems:
        state = f"DAMAGED: {len(problems)} shard(s) missing or damaged ({problems[0]}); run `cache_tools verify`"
    else:
        state = "complete"
    return {
        "path": str(cache_dir),
        "state": state,
        "format_version": m.format_version,
        "builder_version": m.builder_version,
        "complete": m.complete and not problems,
        "teacher": m.teacher.name_or_path,
        "teacher_model_type": m.teacher.model_type,
        "tokenizer": m.tokenizer.name_or_path,
        "vocab_size": m.vocab_size,
        "head_rows": m.teacher.head_rows,
        "targets": dataclasses.asdict(m.targets),
        "top_k": m.slots,
        "max_length": m.max_length,
        "pool_layers": m.pooling.layers,
        "hidden_size": m.pooling.hidden_size,
        "compute_dtype": m.compute_dtype,
        "compression": m.compression,
        "dataset": m.dataset.spec,
        "row_format": m.dataset.row_format,
        "packing": m.packing,
        # What several teachers' caches are compared by (`cache_tools.format.windows`).
        "windows_digests": "recorded" if m.shards and all(sh.windows_digest for sh in m.shards) else
        "not recorded (built before format 3): computed from ids and text when caches are compared",
        "positions_with_targets": _positions_with_targets(Path(cache_dir), m),
        "rows_read": m.rows.read,
        "rows_without_text": m.rows.without_text,
        "num_shards": len(m.shards),
        "num_sequences": m.num_sequences,
        "num_tokens": m.num_tokens,
        "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / tokens if m.num_tokens else 0.0,
        "bytes_per_token_by_dataset": {name: size / tokens for name, size in per_dataset.items()},
        "shard_problems": problems,
        "rows_first_without_text": m.rows.first_without_text,
        "created_at": m.created_at,
    }


def format_summary(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    lines = []
    for key, value in summary.items():
        if key == "bytes_per_token":
            value = f"{value:.1f}"
        elif key == "targets":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key == "bytes_per_token_by_dataset":
            value = ", ".join(f"{k} {v:.1f}" for k, v in value.items())
        elif key == "rows_without_text" and value:
            value = f"{value} (skipped; first at {summary['rows_first_without_text']})"
        elif key == "shard_problems":
            value = "; ".join(value) or "none"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
