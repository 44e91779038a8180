"""`cache_tools inspect`: a summary of a cache directory (text or JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cache_tools import schema


def cache_summary(cache_dir: str | Path) -> dict[str, Any]:
    m = schema.load_manifest(cache_dir)
    total_bytes = sum(s.bytes for s in m.shards)
    return {
        "path": str(cache_dir),
        "format_version": m.format_version,
        "builder_version": m.builder_version,
        "complete": m.complete,
        "teacher": m.teacher.get("name_or_path"),
        "teacher_model_type": m.teacher.get("model_type"),
        "tokenizer": m.tokenizer.get("name_or_path"),
        "vocab_size": m.vocab_size,
        "head_rows": m.teacher.get("head_rows"),
        "top_k": m.top_k,
        "max_length": m.max_length,
        "pool_layers": m.pooling.get("layers"),
        "hidden_size": m.pooling.get("hidden_size"),
        "compute_dtype": m.compute_dtype,
        "dataset": m.dataset.get("spec"),
        "num_shards": len(m.shards),
        "num_sequences": m.num_sequences,
        "num_tokens": m.num_tokens,
        "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / m.num_tokens if m.num_tokens else 0.0,
        "created_at": m.created_at,
    }


def format_summary(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    lines = []
    for key, value in summary.items():
        if key == "bytes_per_token":
            value = f"{value:.1f}"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
