"""Between what the builder produces / the reader returns (target FIELDS) and what a shard stores (DATASETS of
`schema.DATASETS`), for every target kind and encoding. The packed encodings themselves are
`cache_tools.format.codec_zstd` (format 3) and `cache_tools.format.codec` (format 2, read only), imported only when
a compact cache is used.

Fields the builder hands to the writer, per batch of n windows (padded to L positions):
    common   input_ids [n, L], valid_length [n], doc_index [n], text list[str], offsets [n, L, 2],
             pooled_hidden [n, P, H]
    topk     topk_ids [n, L, K] (sorted by log-prob, descending), topk_logprobs [n, L, K], tail_logprob [n, L]
    sampled  sample_ids [n, L, N] (distinct ids, -1 padding), sample_counts [n, L, N] (0 in padding)
    v3       segment_lengths list of int arrays; conversational: assistant_mask [n, L], conversation list of JSON-able
             lists; assistant-only: target_mask [n, L] (the target fields keep every position: `encode_batch`
             keeps only the masked ones)
Every kind is read back as the same `Targets` (see `decode_targets`), and offsets as the same int32 [n, 2] for
every encoding (see `decode_offsets`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache_tools.format import schema
from cache_tools.format.schema import CacheManifest


@dataclass
class Targets:
    """One sequence's targets as the student side sees them, for every kind and encoding (n positions, K slots).

    ids [n, K] int64 (-1 = empty slot); logprobs [n, K] float32 (0 in empty slots); tail [n] float32 (-inf for
    sampled: the sampled support carries all the mass); counts [n, K] int32 draws per slot (sampled only)."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    counts: np.ndarray | None = None


ZSTD_VERSION = 3  # compact caches from this format version on hold `codec_zstd` blobs bound to their rows


def _codec(m: CacheManifest) -> Any:
    """The compact codec of this cache's format version (imported lazily: only compact caches need one). Format 2
    blobs (`codec`, the bit coder) take no sequence index; `_seq` passes it only to the format 3 codec."""
    if m.format_version >= ZSTD_VERSION:
        from cache_tools.format import codec_zstd

        return codec_zstd
    from cache_tools.format import codec

    return codec


def _seq(m: CacheManifest, sequence: int) -> dict[str, int]:
    return {"sequence": int(sequence)} if m.format_version >= ZSTD_VERSION else {}


def encode_text(texts: list[str]) -> np.ndarray:
    """list of n str -> object array of n uint8 arrays (UTF-8 bytes: NUL and every other character round-trip)."""
    out = np.empty(len(texts), dtype=object)
    for i, text in enumerate(texts):
        out[i] = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
    return out


def decode_text(value: Any) -> str:
    """One stored text (version 2: uint8 array; version 1: str or bytes) -> str."""
    if isinstance(value, np.ndarray):
        return value.tobytes().decode("utf-8", errors="surrogatepass")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_STORED_TARGETS = "_stored_targets"  # batch key: per window, how many target positions it stores


def _valid_rows(batch: dict[str, Any], name: str) -> list[np.ndarray]:
    """Per window: field `name` trimmed to its valid positions (target fields: to its stored target positions)."""
    key = _STORED_TARGETS if name in schema.TARGET_FIELDS and _STORED_TARGETS in batch else schema.VALID_LENGTH
    lengths = np.asarray(batch[key])
    array = np.asarray(batch[name])
    return [array[i, : int(n)] for i, n in enumerate(lengths)]


def _only_target_positions(batch: dict[str, Any]) -> dict[str, Any]:
    """Assistant-only caches: each target field's masked positions moved, in order, to the front of its row (zeros
    after), and the count per window recorded for the blob encoders."""
    masks = np.asarray(batch[schema.TARGET_MASK]).astype(bool)
    lengths = np.asarray(batch[schema.VALID_LENGTH])
    masks &= np.arange(masks.shape[1])[None, :] < lengths[:, None]
    out = dict(batch)
    out[_STORED_TARGETS] = masks.sum(axis=1)
    for name in schema.TARGET_FIELDS:
        if name in batch:
            array = np.asarray(batch[name])
            packed = np.zeros_like(array)
            for i, mask in enumerate(masks):
                packed[i, : int(mask.sum())] = array[i, mask]
            out[name] = packed
    return out


def _segment_lengths(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    """A batch without segment lengths (hand-made windows) holds one piece per window."""
    rows = batch.get(schema.SEGMENT_LENGTHS)
    if rows is None:
        rows = [[int(n)] for n in np.asarray(batch[schema.VALID_LENGTH])]
    out = np.empty(len(rows), dtype=object)
    for i, lengths in enumerate(rows):
        out[i] = np.asarray(lengths, dtype=np.int32).reshape(-1)
    return out


def _conversation(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    out = encode_text([json.dumps(record, ensure_ascii=False, separators=(",", ":"))
                       if not isinstance(record, np.ndarray) else "" for record in batch[schema.CONVERSATION]])
    for i, record in enumerate(batch[schema.CONVERSATION]):
        if isinstance(record, np.ndarray):  # already stored bytes (`cache_tools convert` copies them)
            out[i] = np.asarray(record, dtype=np.uint8)
    return out


def _blobs(parts: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(parts), dtype=object)
    for i, part in enumerate(parts):
        out[i] = np.ascontiguousarray(part, dtype=np.uint8).reshape(-1)
    return out


def _topk_blob(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    codec = _codec(m)
    ids, lps = _valid_rows(batch, schema.TOPK_IDS), _valid_rows(batch, schema.TOPK_LOGPROBS)
    return _blobs([codec.encode_topk(i.astype(np.int64), lp.astype(np.float32), m.vocab_size, **_seq(m, first + row))
                   for row, (i, lp) in enumerate(zip(ids, lps, strict=True))])


def _sample_blob(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    codec = _codec(m)
    ids, counts = _valid_rows(batch, schema.SAMPLE_IDS), _valid_rows(batch, schema.SAMPLE_COUNTS)
    return _blobs([codec.encode_sampled(i.astype(np.int64), c.astype(np.int32), m.targets.num_samples, m.vocab_size,
                                        **_seq(m, first + row))
                   for row, (i, c) in enumerate(zip(ids, counts, strict=True))])


def _offsets_blob(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    codec = _codec(m)
    return _blobs([codec.encode_offsets(o, **_seq(m, first + row))
                   for row, o in enumerate(_valid_rows(batch, schema.OFFSETS))])


def _window_blob(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    from cache_tools.format import codec_window

    return _blobs([codec_window.encode_window(ids, text, m.vocab_size, sequence=first + row) for row, (ids, text)
                   in enumerate(zip(_valid_rows(batch, schema.INPUT_IDS), batch[schema.TEXT], strict=True))])


def _sample_ids(m: CacheManifest, batch: dict[str, Any], first: int) -> np.ndarray:
    counts = np.asarray(batch[schema.SAMPLE_COUNTS])
    return np.where(counts > 0, np.asarray(batch[schema.SAMPLE_IDS]), 0)  # unsigned on disk: count 0 marks padding


# Stored datasets that are not a plain dtype cast of the field of the same name.
_ENCODERS = {
    schema.TEXT: lambda m, batch, first: encode_text(list(batch[schema.TEXT])),
    schema.TOPK_BLOB: _topk_blob,
    schema.SAMPLE_BLOB: _sample_blob,
    schema.OFFSETS_BLOB: _offsets_blob,
    schema.WINDOW_BLOB: _window_blob,
    schema.SAMPLE_IDS: _sample_ids,
    schema.SEGMENT_LENGTHS: _segment_lengths,
    schema.CONVERSATION: _conversation,
}


_BLOBS = (schema.TOPK_BLOB, schema.SAMPLE_BLOB, schema.OFFSETS_BLOB, schema.WINDOW_BLOB)


def encode_batch(m: CacheManifest, batch: dict[str, Any], first_sequence: int) -> dict[str, Any]:
    """Fields of n windows -> every stored dataset of this cache's layout (on-disk dtypes), leading dimension n.
    Window i is global sequence `first_sequence + i` (format 3 blobs are bound to it). A batch may carry a blob
    dataset ready made (bound to its row by the caller) instead of the fields it encodes."""
    if m.targets.assistant_only:
        batch = _only_target_positions(batch)
    out = {}
    for spec in schema.datasets_for(m):
        encoder = _ENCODERS.get(spec.name)
        if spec.name in _BLOBS and spec.name in batch:
            out[spec.name] = _blobs(list(batch[spec.name]))  # carried over as made (`cache_tools convert`)
        elif encoder is not None:
            out[spec.name] = encoder(m, batch, first_sequence)
        elif spec.name not in batch:
            raise KeyError(f"batch lacks field {spec.name!r} of the {m.targets.kind}/{m.targets.encoding} layout")
        else:
            out[spec.name] = np.asarray(batch[spec.name]).astype(spec.dtype(m), copy=False)
    return out


def sampled_targets(ids: np.ndarray, counts: np.ndarray, num_samples: int) -> Targets:
    """Distinct sampled ids + counts [n, N] -> Targets: log-probs exactly np.log(count / N) as float32, tail -inf."""
    counts = counts.astype(np.int32)
    present = counts > 0
    logprobs = np.zeros(counts.shape, dtype=np.float32)
    logprobs[present] = np.log(counts[present] / num_samples)
    return Targets(ids=np.where(present, ids.astype(np.int64), -1), logprobs=logprobs,
                   tail=np.full(counts.shape[0], -np.inf, dtype=np.float32), counts=counts)


# What `decode_targets` and the loss masks of a window read (beside its valid length, which trims them): a reader
# that already holds the window (another cache over the same windows) reads only these.
_TARGET_DATASETS = frozenset((*schema.TARGET_FIELDS, schema.TOPK_BLOB, schema.SAMPLE_BLOB, schema.TARGET_MASK,
                              schema.ASSISTANT_MASK))


def target_datasets(m: CacheManifest) -> tuple[schema.DatasetSpec, ...]:
    """The stored datasets holding this cache's targets and the masks that place them (see `decode_targets`,
    `decode_masks`), in table order."""
    return tuple(spec for spec in schema.datasets_for(m) if spec.name in _TARGET_DATASETS)


def target_mask(m: CacheManifest, raw: dict[str, Any], n: int) -> np.ndarray:
    """bool [n]: the positions of this sequence that store teacher targets (all of them unless assistant-only)."""
    if not m.targets.assistant_only:
        return np.ones(n, dtype=bool)
    return np.asarray(raw[schema.TARGET_MASK][:n]).astype(bool)


def decode_targets(m: CacheManifest, raw: dict[str, Any], n: int, sequence: int, *, expand: bool = True) -> Targets:
    """Global sequence `sequence`'s stored target datasets (per-token ones trimmed to its n valid positions) ->
    `Targets` over its n positions; assistant-only caches fill the positions without targets with ids -1, log-probs 0
    and a tail of 0 (top-k) or -inf (sampled); `expand=False` gives only the stored positions. A damaged blob, or
    another row's, raises CodecError; callers name the shard and sequence."""
    if not m.targets.assistant_only:
        return _decode_stored(m, raw, n, sequence)
    mask = target_mask(m, raw, n)
    stored = _decode_stored(m, {k: v[: int(mask.sum())] if k in schema.TARGET_FIELDS else v for k, v in raw.items()},
                            int(mask.sum()), sequence)
    if not expand:
        return stored
    K = stored.ids.shape[-1]
    ids = np.full((n, K), -1, dtype=np.int64)
    logprobs = np.zeros((n, K), dtype=np.float32)
    tail = np.full(n, -np.inf if m.targets.kind == "sampled" else 0.0, dtype=np.float32)
    ids[mask], logprobs[mask], tail[mask] = stored.ids, stored.logprobs, stored.tail
    counts = None
    if stored.counts is not None:
        counts = np.zeros((n, K), dtype=np.int32)
        counts[mask] = stored.counts
    return Targets(ids, logprobs, tail, counts)


def _decode_stored(m: CacheManifest, raw: dict[str, Any], n: int, sequence: int) -> Targets:
    kind, encoding, V = m.targets.kind, m.targets.encoding, m.vocab_size
    if kind == "topk":
        tail = np.asarray(raw[schema.TAIL_LOGPROB], dtype=np.float32)
        if encoding == "fp16":
            return Targets(raw[schema.TOPK_IDS].astype(np.int64), raw[schema.TOPK_LOGPROBS].astype(np.float32), tail)
        ids, logprobs = _codec(m).decode_topk(raw[schema.TOPK_BLOB], n, m.targets.top_k, V, **_seq(m, sequence))
        return Targets(np.asarray(ids, dtype=np.int64), np.asarray(logprobs, dtype=np.float32), tail)
    N = m.targets.num_samples
    if encoding == "fp16":
        return sampled_targets(raw[schema.SAMPLE_IDS], raw[schema.SAMPLE_COUNTS], N)
    ids, counts = _codec(m).decode_sampled(raw[schema.SAMPLE_BLOB], n, N, V, **_seq(m, sequence))
    return sampled_targets(np.asarray(ids), np.asarray(counts), N)


def decode_offsets(m: CacheManifest, raw: dict[str, Any], n: int, sequence: int) -> np.ndarray:
    """Global sequence `sequence`'s stored offsets (the array trimmed to its n valid positions, or the compact blob)
    -> int32 [n, 2] C-contiguous: the same array for both encodings of one build. A damaged blob raises CodecError."""
    if m.targets.encoding == "compact":
        return _codec(m).decode_offsets(raw[schema.OFFSETS_BLOB], n, **_seq(m, sequence))
    return np.ascontiguousarray(raw[schema.OFFSETS], dtype=schema.OFFSET_DTYPE)


def with_window(m: CacheManifest, raw: dict[str, Any], n: int, sequence: int) -> dict[str, Any]:
    """A row as `shard_io.read_row` gives it, with its input ids ([n], as stored or int64) and text (str) whatever
    the cache's window_encoding (a compact one decodes its window blob). A damaged or another row's blob raises
    CodecError; callers name the shard and sequence."""
    if not schema.compact_windows(m):
        return raw
    from cache_tools.format import codec_window

    ids, text = codec_window.decode_window(raw[schema.WINDOW_BLOB], n, m.vocab_size, sequence=sequence)
    return {**raw, schema.INPUT_IDS: ids, schema.TEXT: text}


def decode_packing(m: CacheManifest, raw: dict[str, Any], n: int) -> dict[str, Any]:
    """One sequence's format 3 fields as `CachedSequence` takes them (older caches: one segment, every position with
    targets, no conversation). Damaged JSON raises ValueError; callers name the shard and sequence."""
    segments = raw.get(schema.SEGMENT_LENGTHS)
    conversation = raw.get(schema.CONVERSATION)
    return {
        "segment_lengths": (np.array([n], dtype=np.int32) if segments is None
                            else np.asarray(segments, dtype=np.int32)),
        **decode_masks(m, raw, n),
        "conversation": None if conversation is None else json.loads(decode_text(conversation)),
    }


def decode_masks(m: CacheManifest, raw: dict[str, Any], n: int) -> dict[str, np.ndarray | None]:
    """One sequence's `assistant_mask` (None for plain-text caches) and `target_mask` (all True unless
    assistant-only) as `CachedSequence` takes them."""
    assistant = raw.get(schema.ASSISTANT_MASK)
    return {"assistant_mask": None if assistant is None else np.asarray(assistant[:n]).astype(bool),
            "target_mask": target_mask(m, raw, n)}
