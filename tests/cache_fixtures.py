"""A synthetic teacher cache written with the real `ShardWriter` + `CacheManifest`, for trainer tests that must not
depend on running a teacher (and for planting bad data: NaN targets, incomplete builds, foreign tokenizers).

The "teacher" is a fixed random bigram model: its next-token distribution depends on the current token only, so a
student can actually learn it and KD losses go down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache_tools import schema
from cache_tools.shard_io import ShardWriter


def _windows(tokenizer: Any, texts: list[str], max_length: int, num_sequences: int) -> list[np.ndarray]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_length * num_sequences:
            break
    out = [np.asarray(ids[i : i + max_length], dtype=np.int64) for i in range(0, len(ids), max_length)]
    return [w for w in out if len(w) == max_length][:num_sequences]


def write_synthetic_cache(
    cache_dir: str | Path,
    tokenizer: Any,
    texts: list[str],
    *,
    num_sequences: int = 32,
    max_length: int = 24,
    top_k: int = 8,
    shard_size: int = 8,
    pool_layers: tuple[int, ...] = (0, 1, 2),
    teacher_hidden: int = 64,
    teacher_layers: int = 2,
    complete: bool = True,
    nan_sequence: int | None = None,
    tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a finished (or, with complete=False, unfinished) cache of full-length windows to `cache_dir`."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    V = vocab_size or len(tokenizer)
    rng = np.random.default_rng(seed)
    bigram_logits = rng.normal(0.0, 3.0, size=(len(tokenizer), V)).astype(np.float32)
    windows = _windows(tokenizer, texts, max_length, num_sequences)
    assert len(windows) == num_sequences, f"corpus too small for {num_sequences} windows of {max_length}"
    P = len(pool_layers)
    token_states = rng.normal(size=(len(tokenizer), P, teacher_hidden)).astype(np.float32)
    shards = []
    for shard_index, first in enumerate(range(0, num_sequences, shard_size)):
        chunk = windows[first : first + shard_size]
        writer = ShardWriter(cache_dir, shard_index, first, len(chunk), max_length=max_length, top_k=top_k,
                             vocab_size=V, pooled_shape=(P, teacher_hidden), pool_layers=list(pool_layers))
        n = len(chunk)
        input_ids = np.stack(chunk)
        logits = bigram_logits[input_ids]  # [n, L, V]
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
            logits.max(-1, keepdims=True)
        topk_ids = np.argsort(-logprobs, axis=-1)[..., :top_k]
        topk_lp = np.take_along_axis(logprobs, topk_ids, axis=-1)
        tail_mass = np.clip(1.0 - np.exp(topk_lp).sum(-1), 0.0, None)
        tail = np.maximum(np.log(np.maximum(tail_mass, 1e-45)), schema.TAIL_LOGPROB_FLOOR).astype(np.float32)
        topk_lp = topk_lp.astype(np.float16)
        if nan_sequence is not None and first <= nan_sequence < first + n:
            topk_lp[nan_sequence - first, 3, 0] = np.nan
        writer.append({
            schema.INPUT_IDS: input_ids,
            schema.VALID_LENGTH: np.full(n, max_length, dtype=np.int32),
            schema.DOC_INDEX: np.arange(first, first + n, dtype=np.int64),
            schema.TEXT: [tokenizer.decode(w) for w in chunk],
            schema.OFFSETS: np.zeros((n, max_length, 2), dtype=np.int32),
            schema.TOPK_IDS: topk_ids,
            schema.TOPK_LOGPROBS: topk_lp,
            schema.TAIL_LOGPROB: tail,
            schema.POOLED_HIDDEN: token_states[input_ids].mean(1).astype(np.float16),
        })
        shards.append(writer.finish())
    manifest = schema.CacheManifest(
        builder_version="tests.cache_fixtures",
        complete=complete,
        teacher={"name_or_path": "synthetic-bigram", "hidden_size": teacher_hidden,
                 "num_hidden_layers": teacher_layers, "model_type": "synthetic", "head_rows": V},
        tokenizer={"name_or_path": "test-tokenizer", "content_hash": tokenizer_hash or schema.tokenizer_hash(tokenizer),
                   "vocab_size": V, "special_ids": {"eos": tokenizer.eos_token_id}, "special_tokens": {}},
        top_k=top_k,
        max_length=max_length,
        id_dtype=str(schema.id_dtype_for(V)),
        pooling={"method": "masked_mean", "layers": list(pool_layers), "hidden_size": teacher_hidden},
        dataset={"spec": "synthetic"},
        shard_size=shard_size,
        num_sequences=num_sequences,
        num_tokens=num_sequences * max_length,
        shards=shards,
    )
    manifest.save(cache_dir)
    return cache_dir
