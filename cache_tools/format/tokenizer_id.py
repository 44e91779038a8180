"""The content hash of a tokenizer (what caches, vocabulary maps and cross-tokenizer stores are keyed by)."""

from __future__ import annotations

import json
from typing import Any

from cache_tools.format.manifest import stable_hash


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of a HF tokenizer: vocabulary, merges/normaliser/pre-tokeniser (fast tokenizers) and special
    tokens. Two tokenizers with the same hash split every text identically; loading the same files twice, or from a
    hub id vs a local copy, gives the same hash."""
    payload: dict[str, Any] = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Runtime settings, not content: they change with how the tokenizer is called, not how it splits text.
        for key in ("truncation", "padding"):
            spec.pop(key, None)
        payload["backend"] = spec
    return stable_hash(payload)
