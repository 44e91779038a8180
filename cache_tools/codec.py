"""Compact per-sequence encodings of sparse teacher targets (format v2), pure vectorised numpy.

Two blob kinds, each one sequence of n positions, 1-D uint8:

- top-k (`encode_topk` / `decode_topk`): per position K distinct ids and their log-probs. The ids are sorted
  ascending and their gaps (minus one) Rice-coded with a per-position parameter (~11 bits/id at K = 256 of
  V = 151,936, against the 10.65-bit information bound of a uniform 256-subset). The log-probs stay in that id order
  (so the rank permutation costs nothing) as the row's maximum (float32, exact) plus a `LEVEL_BITS`-bit level of
  d = max - logprob on a companded scale, d = QUANT_SCALE * expm1(level * QUANT_STEP): fine steps near the maximum,
  where the KD loss and its gradient q - p are sensitive (an error of x in log p moves p by p * x), coarse ones far
  below it, where the mass is tiny. Levels are Rice-coded too (counted down from the coarsest level, where most of a
  top-256 row sits). Decoding re-sorts each row by level: ties keep id order.
- sampled (`encode_sampled` / `decode_sampled`): per position the distinct sampled ids and their counts (summing to
  N), LOSSLESS: the number of distinct ids (fixed width), id gaps and count - 1 all Rice-coded per position.

Blob layout: HEADER (magic, kind, ENCODING_VERSION, crc32 of the rest), then [top-k only] the row maxima as
float32 [n], then one byte of Rice parameters per row, then a bit-packed section of fixed-width fields (the Rice
remainders), then the unary section of the Rice quotients (q ones then a zero each). Every reader-side fault
(wrong length, checksum, parameters, ids out of range, counts not summing to N) raises `CodecError`, one line.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

ENCODING_VERSION = 1
MAGIC = b"DK"
KIND_TOPK, KIND_SAMPLED = b"T", b"S"
HEADER = struct.Struct("<2sccI")  # magic, kind, version byte, crc32 of everything after the header
ID_K_BITS = 5  # Rice parameter of id gaps: 0..31 (low 5 bits of the per-row parameter byte)
AUX_K_BITS = 3  # Rice parameter of levels (top-k) or count - 1 (sampled): 0..7 (high 3 bits)
LEVEL_BITS = 6  # log-prob levels 0 .. 2**LEVEL_BITS - 1
QUANT_SCALE = 1.0  # compander scale c (nats): d = c * expm1(t); steps grow ~linearly in d once d >> c
QUANT_MAX_D = 40.0  # d of the coarsest level (nats below the row max); smaller log-probs clip there
NUM_LEVELS = 1 << LEVEL_BITS
QUANT_STEP = float(np.log1p(QUANT_MAX_D / QUANT_SCALE) / (NUM_LEVELS - 1))
MAX_FIELD_BITS = 25  # widest fixed-width field the 4-byte window reader handles (25 + 7 bit offset <= 32)


class CodecError(ValueError):
    """A blob that cannot be decoded (truncated, corrupt, or not what the caller said it holds)."""


# ---- bit packing ------------------------------------------------------------------------------------------------


def _pack_fields(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate values[i] in widths[i] bits (MSB first, widths <= MAX_FIELD_BITS) into bytes, zero-padded."""
    if values.size == 0:
        return np.zeros(0, np.uint8)
    words = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    bits = np.unpackbits(words, axis=1)  # [M, 32], row-major order keeps the fields in sequence
    keep = np.arange(32)[None, :] >= (32 - widths.astype(np.int64))[:, None]
    return np.packbits(bits[keep])


def _read_fields(buf: np.ndarray, offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """values[i] = the widths[i]-bit field at bit offsets[i] of `buf` (as written by `_pack_fields`), int64."""
    padded = np.concatenate([buf, np.zeros(4, np.uint8)]).astype(np.uint64)
    byte = offsets >> 3
    window = (padded[byte] << 24) | (padded[byte + 1] << 16) | (padded[byte + 2] << 8) | padded[byte + 3]
    shift = (32 - (offsets & 7) - widths).astype(np.uint64)
    mask = (np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)
    return ((window >> shift) & mask).astype(np.int64)


def _pack_unary(q: np.ndarray) -> np.ndarray:
    """q[i] ones then a zero, for every i, packed MSB first."""
    ends = np.cumsum(q.astype(np.int64) + 1) - 1
    bits = np.ones(int(ends[-1]) + 1 if q.size else 0, np.uint8)
    bits[ends] = 0
    return np.packbits(bits)


def _read_unary(buf: np.ndarray, count: int) -> np.ndarray:
    """The first `count` unary numbers of `buf`; CodecError unless the section ends within the last byte."""
    zeros = np.flatnonzero(np.unpackbits(buf) == 0)
    if zeros.size < count:
        raise CodecError(f"unary section holds {zeros.size} of the {count} Rice quotients it should: blob truncated")
    if count == 0:
        if buf.size:
            raise CodecError(f"{buf.size} trailing bytes after the last field: blob corrupt")
        return np.zeros(0, np.int64)
    zeros = zeros[:count]
    if (int(zeros[-1]) >> 3) + 1 != buf.size:
        raise CodecError(f"unary section is {buf.size} bytes but its data ends in byte {int(zeros[-1]) >> 3}")
    return np.diff(zeros, prepend=-1) - 1


# ---- Rice coding of non-negative int rows -----------------------------------------------------------------------


def _best_rice_k(values: np.ndarray, counts: np.ndarray, k_max: int) -> np.ndarray:
    """Per row, the k in 0..k_max minimising sum(v >> k) + count * (k + 1) bits. values [n, m] >= 0, padding 0."""
    costs = np.stack([(values >> k).sum(1) + counts * (k + 1) for k in range(k_max + 1)], axis=1)
    return costs.argmin(1).astype(np.int64)


def _rice_split(values: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(quotients, remainders) of flat values, each with its own k."""
    return values >> ks, values & ((np.int64(1) << ks) - 1)


class _Reader:
    """Walks a blob: header check, then plain sections, then the field and unary sections."""

    def __init__(self, blob: np.ndarray, kind: bytes, what: str) -> None:
        blob = np.asarray(blob)
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise CodecError(f"{what} blob must be 1-D uint8, got {blob.dtype} with shape {blob.shape}")
        if blob.size < HEADER.size:
            raise CodecError(f"{what} blob is {blob.size} bytes, shorter than its {HEADER.size}-byte header")
        magic, got_kind, version, crc = HEADER.unpack(blob[: HEADER.size].tobytes())
        if magic != MAGIC or got_kind != kind:
            raise CodecError(f"not a {what} blob (header {magic + got_kind!r}, expected {MAGIC + kind!r})")
        if version[0] != ENCODING_VERSION:
            raise CodecError(f"{what} blob has encoding version {version[0]}; this reader knows {ENCODING_VERSION}")
        self.body = blob[HEADER.size :]
        if zlib.crc32(self.body) != crc:
            raise CodecError(f"{what} blob fails its checksum: corrupt")
        self.pos, self.what = 0, what

    def take(self, nbytes: int) -> np.ndarray:
        if self.pos + nbytes > self.body.size:
            raise CodecError(f"{self.what} blob truncated: needs more than its {self.body.size + HEADER.size} bytes")
        out = self.body[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def fields(self, widths: np.ndarray) -> np.ndarray:
        if widths.size and int(widths.max()) > MAX_FIELD_BITS:
            raise CodecError(f"{self.what} blob asks for a {int(widths.max())}-bit field: corrupt parameters")
        ends = np.cumsum(widths)
        total = int(ends[-1]) if widths.size else 0
        section = self.take((total + 7) // 8)
        return _read_fields(section, ends - widths, widths)

    def unary(self, count: int) -> np.ndarray:
        return _read_unary(self.take(self.body.size - self.pos), count)


def _blob(kind: bytes, parts: list[np.ndarray]) -> np.ndarray:
    body = np.concatenate([np.asarray(p, np.uint8).ravel() for p in parts])
    header = HEADER.pack(MAGIC, kind, bytes([ENCODING_VERSION]), zlib.crc32(body))
    return np.concatenate([np.frombuffer(header, np.uint8), body])


def _levels_to_d() -> np.ndarray:
    """[NUM_LEVELS] float32: the d = max - logprob each level decodes to (level 0 is the row max itself)."""
    return (QUANT_SCALE * np.expm1(np.arange(NUM_LEVELS) * QUANT_STEP)).astype(np.float32)


LEVEL_D = _levels_to_d()


def _sort_rows(ids: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(ids, axis=1, kind="stable")
    return [np.take_along_axis(a, order, 1) for a in (ids, *others)]


def _check_ids(ids: np.ndarray, sorted_ids: np.ndarray, valid: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """Range + distinctness of encoder input; returns gaps - 1 between consecutive sorted ids (0 in padding)."""
    if ids[valid].size and (int(ids[valid].min()) < 0 or int(ids[valid].max()) >= vocab_size):
        raise ValueError(f"{what} ids must lie in [0, vocab_size={vocab_size}); got {ids[valid].min()}..{ids.max()}")
    gaps = np.where(valid, np.diff(sorted_ids, axis=1, prepend=-1) - 1, 0)
    if (gaps < 0).any():
        raise ValueError(f"{what} ids repeat within a position; each row must hold distinct ids")
    return gaps


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    """One sequence's top-k targets -> 1-D uint8 blob.

    ids [n, K] integer, distinct per row, in [0, vocab_size); logprobs [n, K] float (log-probs; -inf allowed and
    stored as the coarsest level, QUANT_MAX_D below the row max). Row order does not matter."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.ndim != 2 or ids.shape != logprobs.shape or ids.shape[1] < 1:
        raise ValueError(f"top-k ids {ids.shape} and logprobs {logprobs.shape} must both be [n, K] with K >= 1")
    n, k = ids.shape
    sorted_ids, lp = _sort_rows(ids.astype(np.int64), logprobs.astype(np.float32))
    gaps = _check_ids(ids, sorted_ids, np.ones(ids.shape, bool), vocab_size, "top-k")
    if np.isnan(lp).any():
        raise ValueError("top-k logprobs hold NaN")
    lp_max = lp.max(1) if n else np.zeros(0, np.float32)
    if not np.isfinite(lp_max).all():
        raise ValueError("top-k logprobs: every row needs a finite maximum (a row is all -inf or holds +inf)")
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.log1p((lp_max[:, None].astype(np.float64) - lp) / QUANT_SCALE) / QUANT_STEP
    levels = np.clip(np.rint(np.nan_to_num(t, nan=0.0, posinf=NUM_LEVELS)), 0, NUM_LEVELS - 1).astype(np.int64)
    down = (NUM_LEVELS - 1) - levels  # Rice-coded from the coarse end: most of a top-256 row sits near it
    k_id = _best_rice_k(gaps, np.full(n, k), min(max(vocab_size - 1, 1).bit_length(), MAX_FIELD_BITS))
    k_lv = _best_rice_k(down, np.full(n, k), (1 << AUX_K_BITS) - 1)
    widths = np.concatenate([np.repeat(k_id, k), np.repeat(k_lv, k)])
    q, r = _rice_split(np.concatenate([gaps.ravel(), down.ravel()]), widths)
    params = (k_id | (k_lv << ID_K_BITS)).astype(np.uint8)
    parts = [lp_max.astype("<f4").view(np.uint8), params, _pack_fields(r, widths), _pack_unary(q)]
    return _blob(KIND_TOPK, parts)


def decode_topk(blob: np.ndarray, n: int, K: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob -> (ids [n, K] int64, logprobs [n, K] float32), each row sorted by log-prob descending (ties: id order).
    Raises CodecError when the blob is not a valid top-k blob of that shape and vocabulary."""
    reader = _Reader(blob, KIND_TOPK, "top-k")
    lp_max = reader.take(4 * n).view("<f4").astype(np.float32)
    params = reader.take(n).astype(np.int64)
    k_id, k_lv = params & ((1 << ID_K_BITS) - 1), params >> ID_K_BITS
    widths = np.concatenate([np.repeat(k_id, K), np.repeat(k_lv, K)])
    rem = reader.fields(widths)
    values = (reader.unary(2 * n * K) << widths) | rem
    gaps, down = values[: n * K].reshape(n, K), values[n * K :].reshape(n, K)
    if n and (int(gaps.max()) >= vocab_size or int(down.max()) >= NUM_LEVELS or not np.isfinite(lp_max).all()):
        raise CodecError(f"top-k blob decodes to ids >= vocab_size={vocab_size}, bad levels or a non-finite max")
    ids = np.cumsum(gaps + 1, axis=1) - 1
    if n and int(ids[:, -1].max()) >= vocab_size:
        raise CodecError(f"top-k blob decodes to ids >= vocab_size={vocab_size}: corrupt, or another vocabulary")
    levels = ((NUM_LEVELS - 1) - down).astype(np.int16)  # int16: numpy's stable sort is a radix sort here
    order = np.argsort(levels, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, 1)
    logprobs = lp_max[:, None] - LEVEL_D[np.take_along_axis(levels, order, 1)]
    return ids, logprobs.astype(np.float32, copy=False)


def check_topk(blob: np.ndarray, n: int, K: int, vocab_size: int) -> None:
    """Raise CodecError unless `blob` decodes to n positions of K distinct ids < vocab_size (what `verify` runs)."""
    decode_topk(blob, n, K, vocab_size)


def _count_width(num_samples: int) -> int:
    """Bits of the per-position field holding (number of distinct ids - 1) <= num_samples - 1."""
    if not 1 <= num_samples <= (1 << MAX_FIELD_BITS):
        raise ValueError(f"num_samples={num_samples} must lie in [1, {1 << MAX_FIELD_BITS}]")
    return (num_samples - 1).bit_length()


def encode_sampled(ids: np.ndarray, counts: np.ndarray, num_samples: int, vocab_size: int) -> np.ndarray:
    """One sequence's sampled targets -> 1-D uint8 blob, lossless.

    ids [n, S] integer: distinct sampled ids per row, padded with -1 (any order, any S); counts [n, S] integer:
    their counts, 0 in padding, each row summing to num_samples."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    if ids.ndim != 2 or ids.shape != counts.shape:
        raise ValueError(f"sampled ids {ids.shape} and counts {counts.shape} must both be [n, S]")
    width_m = _count_width(num_samples)
    valid = ids >= 0
    if (counts[~valid] != 0).any() or (counts[valid] < 1).any():
        raise ValueError("sampled counts must be >= 1 for every id and 0 in the -1 padding")
    if (counts.sum(1, dtype=np.int64) != num_samples).any():
        raise ValueError(f"sampled counts must sum to num_samples={num_samples} in every row")
    key = np.where(valid, ids.astype(np.int64), np.iinfo(np.int64).max)  # padding sorts last
    sorted_ids, cnt = _sort_rows(key, counts.astype(np.int64))
    m = valid.sum(1)
    valid = np.arange(ids.shape[1])[None, :] < m[:, None]
    gaps = _check_ids(sorted_ids, sorted_ids, valid, vocab_size, "sampled")
    cm1 = np.where(valid, cnt - 1, 0)
    k_id = _best_rice_k(gaps, m, min(max(vocab_size - 1, 1).bit_length(), MAX_FIELD_BITS))
    k_ct = _best_rice_k(cm1, m, (1 << AUX_K_BITS) - 1)
    widths = np.concatenate([np.repeat(k_id, m), np.repeat(k_ct, m)])
    q, r = _rice_split(np.concatenate([gaps[valid], cm1[valid]]), widths)
    params = (k_id | (k_ct << ID_K_BITS)).astype(np.uint8)
    sizes = _pack_fields(m - 1, np.full(len(m), width_m))
    return _blob(KIND_SAMPLED, [params, sizes, _pack_fields(r, widths), _pack_unary(q)])


def decode_sampled(blob: np.ndarray, n: int, num_samples: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob -> (ids [n, num_samples] int64 ascending per row, padded with -1; counts [n, num_samples] int32, 0 in
    padding). Raises CodecError when the blob is not a valid sampled blob of that shape, N and vocabulary."""
    width_m = _count_width(num_samples)
    reader = _Reader(blob, KIND_SAMPLED, "sampled")
    params = reader.take(n).astype(np.int64)
    k_id, k_ct = params & ((1 << ID_K_BITS) - 1), params >> ID_K_BITS
    m = reader.fields(np.full(n, width_m, np.int64)) + 1
    if n and int(m.max()) > num_samples:
        raise CodecError(f"sampled blob claims {int(m.max())} distinct ids at a position, more than N={num_samples}")
    widths = np.concatenate([np.repeat(k_id, m), np.repeat(k_ct, m)])
    rem = reader.fields(widths)
    total = int(m.sum())
    values = (reader.unary(2 * total) << widths) | rem
    rows = np.repeat(np.arange(n), m)
    cols = np.arange(total) - np.repeat(np.cumsum(m) - m, m)
    steps = np.zeros((n, num_samples), np.int64)
    counts = np.zeros((n, num_samples), np.int64)
    steps[rows, cols] = values[:total] + 1
    counts[rows, cols] = values[total:] + 1
    if total and int(values[:total].max()) >= vocab_size:
        raise CodecError(f"sampled blob decodes to ids >= vocab_size={vocab_size}: corrupt, or another vocabulary")
    ids = np.where(counts > 0, np.cumsum(steps, axis=1) - 1, -1)
    if total and int(ids.max()) >= vocab_size:
        raise CodecError(f"sampled blob decodes to ids >= vocab_size={vocab_size}: corrupt, or another vocabulary")
    if (counts.sum(1) != num_samples).any():
        raise CodecError(f"sampled blob decodes to counts that do not sum to N={num_samples}: corrupt")
    return ids, counts.astype(np.int32)


def check_sampled(blob: np.ndarray, n: int, num_samples: int, vocab_size: int) -> None:
    """Raise CodecError unless `blob` decodes to n positions of distinct ids < vocab_size with counts summing to N."""
    decode_sampled(blob, n, num_samples, vocab_size)
