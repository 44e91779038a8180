"""Helpers for the cross-tokenizer tests and the loader benchmark: a teacher cache of real packed windows (the cache
side's `pack_windows`, so texts, offsets and EOS separators are exactly what `build-cache` writes) with synthetic
teacher distributions, written through the real `ShardWriter` + `CacheManifest`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema
from cache_tools.format.shard_io import ShardWriter
from cache_tools.format.text_data import pack_windows


def synthetic_topk(ids: np.ndarray, vocab_size: int, top_k: int, rng: np.random.Generator,
                   tail_mass: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k rows for a window `ids` [n]: slot 0 is the true next token (a confident teacher), the rest distinct
    pseudo-random ids of the true vocabulary. Returns topk_ids [n, K], fp16 logprobs sorted descending, fp32 tail."""
    n = ids.shape[0]
    nxt = np.append(ids[1:], ids[:1])
    offset = rng.integers(0, vocab_size, size=(n, 1))
    step = 7919 if vocab_size % 7919 else 7907  # a prime that does not divide V: the K ids of a row are distinct
    others = (offset + (np.arange(1, top_k) * step)[None, :]) % vocab_size
    clash = others == nxt[:, None]
    others = np.where(clash, (offset + top_k * step) % vocab_size, others)
    topk_ids = np.concatenate([nxt[:, None], others], axis=1)
    for row in np.flatnonzero([len(set(r)) < top_k for r in topk_ids.tolist()]):  # rare: re-draw by hand
        pool = np.setdiff1d(np.arange(min(vocab_size, 4 * top_k + 1)), [nxt[row]])
        topk_ids[row, 1:] = rng.choice(pool, size=top_k - 1, replace=False)
    logits = np.sort(rng.normal(0.0, 2.0, size=(n, top_k)), axis=1)[:, ::-1]
    logits[:, 0] += 3.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = probs / probs.sum(1, keepdims=True) * (1.0 - tail_mass)
    tail = np.full(n, np.log(tail_mass), dtype=np.float32)
    return topk_ids, np.log(probs).astype(np.float16), tail


def write_text_cache(cache_dir: str | Path, tokenizer: Any, texts: list[str], *, max_length: int = 64,
                     top_k: int = 8, shard_size: int = 16, max_sequences: int | None = None,
                     pooled_shape: tuple[int, int] = (2, 8), seed: int = 0, name_or_path: str | None = None,
                     windows: list[Any] | None = None, num_samples: int = 0) -> Path:
    """Pack `texts` with `tokenizer` into windows and write a complete cache (or pass pre-made `windows`).
    `num_samples` > 0 writes sampled targets (format v2: N draws per position, `sampled_rows`) instead of top-k."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if windows is None:
        windows = list(pack_windows(tokenizer, enumerate(texts), max_length))
    windows = windows[:max_sequences] if max_sequences else windows
    vocab = len(tokenizer)
    P, H = pooled_shape
    roles = ("bos", "eos", "pad", "unk")
    manifest = schema.CacheManifest(
        complete=True,
        teacher=schema.TeacherInfo(name_or_path="synthetic", head_rows=vocab),
        tokenizer=schema.TokenizerInfo(name_or_path=name_or_path or str(getattr(tokenizer, "name_or_path", "")),
                                       content_hash=schema.tokenizer_hash(tokenizer), vocab_size=vocab,
                                       special_ids={r: getattr(tokenizer, f"{r}_token_id", None) for r in roles},
                                       special_tokens={r: getattr(tokenizer, f"{r}_token", None) for r in roles}),
        targets=(schema.TargetsInfo(kind="sampled", encoding="fp16", top_k=0, num_samples=num_samples) if num_samples
                 else schema.TargetsInfo(kind="topk", encoding="fp16", top_k=top_k)), max_length=max_length,
        id_dtype=str(schema.id_dtype_for(vocab)), pooling=schema.PoolingInfo(layers=list(range(P)), hidden_size=H),
        shard_size=shard_size, num_sequences=len(windows), num_tokens=int(sum(len(w.input_ids) for w in windows)),
    )
    for index, first in enumerate(range(0, len(windows), shard_size)):
        chunk = windows[first : first + shard_size]
        writer = ShardWriter(cache_dir, index, first, len(chunk), manifest)
        batch: dict[str, Any] = {
            schema.INPUT_IDS: np.zeros((len(chunk), max_length), np.int64),
            schema.VALID_LENGTH: np.array([len(w.input_ids) for w in chunk], np.int32),
            schema.DOC_INDEX: np.array([w.doc_index for w in chunk], np.int64),
            schema.TEXT: [w.text for w in chunk],
            schema.OFFSETS: np.zeros((len(chunk), max_length, 2), np.int32),
            schema.TOPK_IDS: np.zeros((len(chunk), max_length, top_k), np.int64),
            schema.TOPK_LOGPROBS: np.zeros((len(chunk), max_length, top_k), np.float16),
            schema.TAIL_LOGPROB: np.zeros((len(chunk), max_length), np.float32),
            schema.POOLED_HIDDEN: rng.normal(size=(len(chunk), P, H)).astype(np.float16),
        }
        for row, w in enumerate(chunk):
            n = len(w.input_ids)
            ids, lp, tail = synthetic_topk(w.input_ids, vocab, top_k, rng)
            batch[schema.INPUT_IDS][row, :n] = w.input_ids
            batch[schema.OFFSETS][row, :n] = w.offsets
            batch[schema.TOPK_IDS][row, :n] = ids
            batch[schema.TOPK_LOGPROBS][row, :n] = lp
            batch[schema.TAIL_LOGPROB][row, :n] = tail
        if num_samples:
            for name in (schema.TOPK_IDS, schema.TOPK_LOGPROBS, schema.TAIL_LOGPROB):
                del batch[name]
            batch[schema.SAMPLE_IDS] = np.full((len(chunk), max_length, num_samples), -1, np.int64)
            batch[schema.SAMPLE_COUNTS] = np.zeros((len(chunk), max_length, num_samples), np.int32)
            for row, w in enumerate(chunk):
                ids, _, _, counts = sampled_rows(rng, len(w.input_ids), vocab, num_samples, num_samples)
                batch[schema.SAMPLE_IDS][row, : len(w.input_ids)] = ids
                batch[schema.SAMPLE_COUNTS][row, : len(w.input_ids)] = counts
        writer.append(batch)
        manifest.shards.append(writer.finish())
    manifest.save(cache_dir)
    return cache_dir


_TOKENIZERS: dict[tuple, Any] = {}


def trained_tokenizer(corpus: list[str], vocab_size: int, *, split_digits: bool = False,
                      extra_special: tuple[str, ...] = ()) -> Any:
    """A locally trained byte-level BPE tokenizer, trained once per process per setting (tests and bench share it)."""
    from examples.tiny_models import train_bpe_tokenizer

    key = (id(corpus), vocab_size, split_digits, extra_special)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = train_bpe_tokenizer(corpus, vocab_size, split_digits=split_digits,
                                               extra_special=extra_special)
    return _TOKENIZERS[key]



def sampled_rows(rng: np.random.Generator, n: int, vocab_size: int, num_samples: int, slots: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sampled targets as the reader gives them (format v2): per row, the distinct ids of `num_samples` draws (any
    order, -1 padding to `slots`), log(count / N) as float32 (0 in padding), tail -inf. Returns ids [n, slots] int64,
    logprobs [n, slots] float32, tail [n] float32, counts [n, slots] int64 (0 in padding)."""
    ids = np.full((n, slots), -1, np.int64)
    counts = np.zeros((n, slots), np.int64)
    for row in range(n):
        support = rng.choice(vocab_size, size=int(rng.integers(1, slots + 1)), replace=False)
        draws = rng.choice(support, size=num_samples, p=rng.dirichlet(np.ones(support.size)))
        uniq, cnt = np.unique(draws, return_counts=True)
        order = rng.permutation(uniq.size)
        ids[row, : uniq.size], counts[row, : uniq.size] = uniq[order], cnt[order]
    logprobs = np.where(counts > 0, np.log(np.maximum(counts, 1) / num_samples), 0.0).astype(np.float32)
    return ids, logprobs, np.full(n, -np.inf, np.float32), counts
