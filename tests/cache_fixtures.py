"""A synthetic teacher cache written with the real `ShardWriter` + `CacheManifest`, for trainer tests that must not
depend on running a teacher (and for planting bad data: NaN targets, incomplete builds, foreign tokenizers).

The "teacher" is a fixed random bigram model: its next-token distribution depends on the current token only, so a
student can actually learn it and KD losses go down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema
from cache_tools.format.shard_io import ShardWriter


def _windows(tokenizer: Any, texts: list[str], max_length: int, num_sequences: int) -> list[np.ndarray]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_length * num_sequences:
            break
    out = [np.asarray(ids[i : i + max_length], dtype=np.int64) for i in range(0, len(ids), max_length)]
    return [w for w in out if len(w) == max_length][:num_sequences]


def _offsets(tokenizer: Any, ids: np.ndarray, text: str) -> np.ndarray:
    """[L, 2] int32 character offsets of each token of a window in its text (= decode(ids)): token j spans what
    decoding it adds to the prefix (empty where a byte-level token ends inside a character), so compact and fp16
    caches are compared on real-looking offsets and `verify`'s 0 <= start <= end <= len(text) holds."""
    ends = np.array([len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))], dtype=np.int64)
    ends = np.minimum(np.maximum.accumulate(ends), len(text))
    return np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1).astype(np.int32)


def synthetic_manifest(tokenizer: Any, *, vocab_size: int, max_length: int, targets: schema.TargetsInfo,
                       pool_layers: tuple[int, ...], teacher_hidden: int, teacher_layers: int, shard_size: int,
                       tokenizer_hash: str | None = None, complete: bool = True) -> schema.CacheManifest:
    """The manifest of a synthetic cache (shards and counts filled in by the caller)."""
    return schema.CacheManifest(
        builder_version="tests.cache_fixtures",
        complete=complete,
        teacher=schema.TeacherInfo(name_or_path="synthetic-bigram", hidden_size=teacher_hidden,
                                   num_hidden_layers=teacher_layers, model_type="synthetic", head_rows=vocab_size),
        tokenizer=schema.TokenizerInfo(name_or_path="test-tokenizer",
                                       content_hash=tokenizer_hash or schema.tokenizer_hash(tokenizer),
                                       vocab_size=vocab_size, special_ids={"eos": tokenizer.eos_token_id}),
        targets=targets,
        max_length=max_length,
        id_dtype=str(schema.id_dtype_for(vocab_size)),
        pooling=schema.PoolingInfo(layers=list(pool_layers), hidden_size=teacher_hidden),
        dataset=schema.DatasetInfo(spec="synthetic"),
        shard_size=shard_size,
    )


def topk_fields(logprobs: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Exact top-k fields of full log-probs [..., V]: ids sorted by log-prob, fp16 log-probs, floored fp32 tail."""
    topk_ids = np.argsort(-logprobs, axis=-1, kind="stable")[..., :top_k]
    topk_lp = np.take_along_axis(logprobs, topk_ids, axis=-1)
    tail_mass = np.clip(1.0 - np.exp(topk_lp).sum(-1), 0.0, None)
    tail = np.maximum(np.log(np.maximum(tail_mass, 1e-45)), schema.TAIL_LOGPROB_FLOOR).astype(np.float32)
    return {schema.TOPK_IDS: topk_ids, schema.TOPK_LOGPROBS: topk_lp.astype(np.float16), schema.TAIL_LOGPROB: tail}


def sampled_fields(logprobs: np.ndarray, num_samples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N draws per position from exp(logprobs) [..., V] -> distinct ids ascending (-1 padding) + counts [..., N]."""
    flat = np.exp(logprobs.reshape(-1, logprobs.shape[-1]).astype(np.float64))
    cdf = np.cumsum(flat / flat.sum(-1, keepdims=True), axis=-1)
    ids = np.full((flat.shape[0], num_samples), -1, dtype=np.int64)
    counts = np.zeros((flat.shape[0], num_samples), dtype=np.int32)
    for row in range(flat.shape[0]):
        draws = np.minimum(np.searchsorted(cdf[row], rng.random(num_samples)), flat.shape[1] - 1)
        distinct, times = np.unique(draws, return_counts=True)
        ids[row, : len(distinct)], counts[row, : len(distinct)] = distinct, times
    shape = (*logprobs.shape[:-1], num_samples)
    return {schema.SAMPLE_IDS: ids.reshape(shape), schema.SAMPLE_COUNTS: counts.reshape(shape)}


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
    targets: schema.TargetsInfo | None = None,
    format_version: int = schema.FORMAT_VERSION,
    window_encoding: str | None = None,
) -> Path:
    """Write a finished (or, with complete=False, unfinished) cache of full-length windows to `cache_dir`.
    `targets` picks kind and encoding (default: top-`top_k`, fp16). format_version=2 writes a format 2 cache (its
    compact blobs from the format 2 bit coder, not bound to their rows) as the version 2 builder did.
    `window_encoding`: default as a build records it ("arrays" writes a compact cache's ids and text as datasets, as
    format 3 builds did before window blobs)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    V = vocab_size or len(tokenizer)
    targets = targets or schema.TargetsInfo(kind="topk", encoding="fp16", top_k=top_k)
    rng = np.random.default_rng(seed)
    bigram_logits = rng.normal(0.0, 3.0, size=(len(tokenizer), V)).astype(np.float32)
    windows = _windows(tokenizer, texts, max_length, num_sequences)
    assert len(windows) == num_sequences, f"corpus too small for {num_sequences} windows of {max_length}"
    P = len(pool_layers)
    token_states = rng.normal(size=(len(tokenizer), P, teacher_hidden)).astype(np.float32)
    manifest = synthetic_manifest(tokenizer, vocab_size=V, max_length=max_length, targets=targets,
                                  pool_layers=pool_layers, teacher_hidden=teacher_hidden, teacher_layers=teacher_layers,
                                  shard_size=shard_size, tokenizer_hash=tokenizer_hash, complete=complete)
    manifest.format_version = format_version
    manifest.window_encoding = schema.window_encoding_for(targets) if window_encoding is None else window_encoding
    for shard_index, first in enumerate(range(0, num_sequences, shard_size)):
        chunk = windows[first : first + shard_size]
        writer = ShardWriter(cache_dir, shard_index, first, len(chunk), manifest)
        n = len(chunk)
        input_ids = np.stack(chunk)
        logits = bigram_logits[input_ids]  # [n, L, V]
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
            logits.max(-1, keepdims=True)
        if targets.kind == "topk":
            fields = topk_fields(logprobs, targets.top_k)
            if nan_sequence is not None and first <= nan_sequence < first + n:
                fields[schema.TOPK_LOGPROBS][nan_sequence - first, 3, 0] = np.nan
        else:
            fields = sampled_fields(logprobs, targets.num_samples, rng)
        texts_of_chunk = [tokenizer.decode(w) for w in chunk]
        writer.append({
            schema.INPUT_IDS: input_ids,
            schema.VALID_LENGTH: np.full(n, max_length, dtype=np.int32),
            schema.DOC_INDEX: np.arange(first, first + n, dtype=np.int64),
            schema.TEXT: texts_of_chunk,
            schema.OFFSETS: np.stack([_offsets(tokenizer, w, t) for w, t in zip(chunk, texts_of_chunk, strict=True)]),
            schema.POOLED_HIDDEN: token_states[input_ids].mean(1).astype(np.float16),
            **fields,
        })
        manifest.shards.append(writer.finish())
    manifest.num_sequences = num_sequences
    manifest.num_tokens = num_sequences * max_length
    manifest.save(cache_dir)
    return cache_dir
