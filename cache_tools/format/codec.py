"""Compact per-sequence encodings of sparse teacher targets and token offsets (format v2), pure vectorised numpy.

Three blob kinds, each one sequence of n positions, 1-D uint8 (framing and codes: `cache_tools.format.codec_bits`):

- top-k (`encode_topk` / `decode_topk`): per position K distinct ids and their log-probs. The ids are sorted
  ascending and their gaps (minus one) Exp-Golomb-coded with a per-position parameter: a teacher's support is dense
  among the frequent (low) ids and sparse above, which a log-cost code exploits (~8 bits/id measured at K = 256 of
  V = 151,936, below the 10.65-bit bound of a uniformly random 256-subset). The log-probs stay in that id order (so
  the rank permutation costs nothing) as the row's maximum (float32, exact) plus a level of d = max - logprob on a
  companded scale, d = QUANT_SCALE * expm1(t), t uniform in [0, t_row] with 2**level_bits levels. t_row, the row's
  own range, is one byte (RANGE_STEPS steps up to QUANT_MAX_D): a flat row gets fine steps over its few nats, a
  sharp row stretches to its far entries. Steps are finest at the maximum and grow with d, since an error of x in
  log p moves the KD gradient q - p by p * x; QUANT_SCALE trades that against the loss value, whose error follows
  sum(p * x^2) (bench/bench_codec.py measures both). Levels are Rice-coded counted down from the coarsest level,
  where most of a top-256 row sits. Decoding re-sorts each row by level; ties keep id order.
- sampled (`encode_sampled` / `decode_sampled`): per position the distinct sampled ids and their counts (summing to
  N), LOSSLESS: the number of distinct ids (fixed width), then id gaps and count - 1, Exp-Golomb-coded.
- offsets (`encode_offsets` / `decode_offsets`, in `codec_offsets`): the (start, end) character offsets
  of each token, LOSSLESS, as Exp-Golomb-coded gaps and lengths.

Layout of top-k and sampled blobs after the header: [top-k] row maxima float32 [n], row ranges uint8 [n]; one byte
of code parameters per row (id k in the low ID_K_BITS bits, level / count k above); [sampled] the distinct-id
counts; then the unary parts of all codes (byte count uint32, then the section) and their fixed-width fields.
Every reader-side fault (length, checksum, parameters, ids out of range, counts not summing to N) raises
`CodecError`, one line.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from cache_tools.format.codec_bits import (
    ENCODING_VERSION,
    HEADER,
    MAX_FIELD_BITS,
    BlobReader,
    best_k,
    make_blob,
    pack_fields,
    pack_streams,
)
from cache_tools.format.codec_offsets import check_offsets, decode_offsets, encode_offsets
from cache_tools.format.errors import CodecError

__all__ = ["ENCODING_VERSION", "HEADER", "MAX_FIELD_BITS", "CodecError", "encode_topk", "decode_topk", "check_topk",
           "encode_sampled", "decode_sampled", "check_sampled", "LEVEL_BITS", "QUANT_SCALE", "QUANT_MAX_D",
           "RANGE_STEPS", "encode_offsets", "decode_offsets", "check_offsets"]

KIND_TOPK, KIND_SAMPLED = b"T", b"S"
ID_K_BITS = 5  # Exp-Golomb parameter of id gaps: 0..31 (low 5 bits of the per-row parameter byte)
AUX_K_BITS = 3  # parameter of levels (Rice, top-k) or count - 1 (Exp-Golomb, sampled): 0..7 (high 3 bits)
LEVEL_BITS = 7  # default log-prob levels per position: 2**LEVEL_BITS (a blob records its own, 1..8)
QUANT_SCALE = 4.0  # compander scale c (nats): d = c * expm1(t); steps ~ uniform in t below c, growing above
QUANT_MAX_D = 32.0  # widest row range (nats below the row max); smaller log-probs (and -inf) clip there
RANGE_STEPS = 255  # row range byte r: t_row = r / RANGE_STEPS * log1p(QUANT_MAX_D / QUANT_SCALE)
T_MAX = float(np.log1p(QUANT_MAX_D / QUANT_SCALE))


@lru_cache(maxsize=8)
def level_table(level_bits: int) -> np.ndarray:
    """[RANGE_STEPS + 1, 2**level_bits] float32: d = max - logprob of (row range byte, level); decoding is one
    gather. Level 0 is the row max itself (d = 0); the last level of range r is d = c * expm1(t_row)."""
    fraction = np.arange(1 << level_bits) / ((1 << level_bits) - 1)
    t = np.arange(RANGE_STEPS + 1)[:, None] * (T_MAX / RANGE_STEPS) * fraction[None, :]
    return (QUANT_SCALE * np.expm1(t)).astype(np.float32)


def quantise_logprobs(lp: np.ndarray, level_bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, K] finite-max log-probs -> (row max float32 [n], range byte [n], levels [n, K] int64)."""
    top = (1 << level_bits) - 1
    lp_max = lp.max(1) if lp.shape[0] else np.zeros(0, np.float32)
    with np.errstate(invalid="ignore"):
        d = np.minimum(lp_max[:, None].astype(np.float64) - lp, QUANT_MAX_D)  # -inf entries -> QUANT_MAX_D
    t = np.log1p(d / QUANT_SCALE)
    ranges = np.ceil(t.max(1, initial=0.0) / T_MAX * RANGE_STEPS - 1e-9).clip(0, RANGE_STEPS).astype(np.int64)
    step = np.maximum(ranges, 1)[:, None] * (T_MAX / RANGE_STEPS) / top
    levels = np.clip(np.rint(t / step), 0, top).astype(np.int64)
    return lp_max.astype(np.float32), ranges, levels


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


def _id_k_max(vocab_size: int) -> int:
    """Largest Exp-Golomb parameter of id gaps; with vocab_size <= 2**MAX_FIELD_BITS every field then fits."""
    if not 1 <= vocab_size <= (1 << MAX_FIELD_BITS):
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {1 << MAX_FIELD_BITS}]")
    return min(max(vocab_size - 1, 1).bit_length(), MAX_FIELD_BITS - 1)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, *, level_bits: int = LEVEL_BITS) -> np.ndarray:
    """One sequence's top-k targets -> 1-D uint8 blob.

    ids [n, K] integer, distinct per row, in [0, vocab_size); logprobs [n, K] float (log-probs; -inf allowed and
    stored QUANT_MAX_D below the row max). Row order does not matter. level_bits (1..8) sets the precision."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.ndim != 2 or ids.shape != logprobs.shape or ids.shape[1] < 1:
        raise ValueError(f"top-k ids {ids.shape} and logprobs {logprobs.shape} must both be [n, K] with K >= 1")
    if not 1 <= level_bits <= 8:
        raise ValueError(f"level_bits={level_bits} must lie in 1..8")
    n, k = ids.shape
    sorted_ids, lp = _sort_rows(ids.astype(np.int64), logprobs.astype(np.float32))
    gaps = _check_ids(ids, sorted_ids, np.ones(ids.shape, bool), vocab_size, "top-k")
    if np.isnan(lp).any():
        raise ValueError("top-k logprobs hold NaN")
    if n and not np.isfinite(lp.max(1)).all():
        raise ValueError("top-k logprobs: every row needs a finite maximum (a row is all -inf or holds +inf)")
    lp_max, ranges, levels = quantise_logprobs(lp, level_bits)
    down = ((1 << level_bits) - 1) - levels  # Rice-coded from the coarse end: most of a top-256 row sits near it
    k_id = best_k(gaps, None, _id_k_max(vocab_size), True)
    k_lv = best_k(down, None, min((1 << AUX_K_BITS) - 1, level_bits), False)
    params = (k_id | (k_lv << ID_K_BITS)).astype(np.uint8)
    streams = [(gaps.ravel(), np.repeat(k_id, k), True), (down.ravel(), np.repeat(k_lv, k), False)]
    parts = [lp_max.astype("<f4").view(np.uint8), ranges.astype(np.uint8), params, *pack_streams(streams)]
    return make_blob(KIND_TOPK, parts, level_bits)


def decode_topk(blob: np.ndarray, n: int, K: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob -> (ids [n, K] int64, logprobs [n, K] float32), each row sorted by log-prob descending (ties: id order).
    Raises CodecError when the blob is not a valid top-k blob of that shape and vocabulary."""
    ids, levels, lp_max, ranges, level_bits = topk_levels(blob, n, K, vocab_size)
    levels = levels.astype(np.int16)  # int16: numpy's stable sort is a radix sort here
    flat = np.argsort(levels, axis=1, kind="stable")
    flat += np.arange(0, n * K, K)[:, None]  # row-major flat positions: one take per array, no take_along_axis
    cell = levels.take(flat) + (ranges << level_bits)[:, None]  # (range, level) -> row of the level table
    logprobs = level_table(level_bits).take(cell)
    np.subtract(lp_max[:, None], logprobs, out=logprobs)
    return ids.take(flat), logprobs


def topk_levels(blob: np.ndarray, n: int, K: int,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """A top-k blob's stored numbers: (ids [n, K] int64 ascending per row, levels [n, K] int64 in that order, row
    maxima float32 [n], range bytes [n] int64, level bits): what converting it to another compact codec keeps."""
    reader = BlobReader(blob, KIND_TOPK, "top-k")
    level_bits = reader.param
    if not 1 <= level_bits <= 8:
        raise CodecError(f"top-k blob says {level_bits} level bits (1..8): corrupt")
    lp_max = reader.take(4 * n).view("<f4").astype(np.float32)
    ranges = reader.take(n).astype(np.int64)
    params = reader.take(n).astype(np.int64)
    k_id, k_lv = params & ((1 << ID_K_BITS) - 1), params >> ID_K_BITS
    gaps, down = reader.streams([(np.repeat(k_id, K), True), (np.repeat(k_lv, K), False)])
    gaps, down = gaps.reshape(n, K), down.reshape(n, K)
    if n and (int(gaps.max()) >= vocab_size or int(down.max()) >= (1 << level_bits)):
        raise CodecError(f"top-k blob decodes to ids >= vocab_size={vocab_size} or levels beyond {level_bits} bits")
    if not np.isfinite(lp_max).all():
        raise CodecError("top-k blob holds a non-finite row maximum: corrupt")
    ids = np.cumsum(gaps + 1, axis=1) - 1
    if n and int(ids[:, -1].max()) >= vocab_size:
        raise CodecError(f"top-k blob decodes to ids >= vocab_size={vocab_size}: corrupt, or another vocabulary")
    return ids, ((1 << level_bits) - 1) - down, lp_max, ranges, level_bits


def check_topk(blob: np.ndarray, n: int, K: int, vocab_size: int) -> None:
    """Raise CodecError unless `blob` decodes to n positions of K distinct ids < vocab_size (what `verify` runs)."""
    decode_topk(blob, n, K, vocab_size)


def _count_width(num_samples: int) -> int:
    """Bits of the per-position field holding (number of distinct ids - 1) <= num_samples - 1."""
    if not 1 <= num_samples <= (1 << MAX_FIELD_BITS):
        raise ValueError(f"num_samples={num_samples} must lie in [1, {1 << MAX_FIELD_BITS}]")
    return (num_samples - 1).bit_length()


def sampled_rows(ids: np.ndarray, counts: np.ndarray, num_samples: int,
                 vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked sampled targets in the order both compact codecs store them: (counts [n, S] int64 by ascending id,
    distinct ids per row m [n], valid slots [n, S] bool (the first m of each row), id gaps [n, S] from `_check_ids`).
    Raises ValueError on targets that break the contract (shapes, padding, counts not summing to num_samples)."""
    ids, counts = np.asarray(ids), np.asarray(counts)
    if ids.ndim != 2 or ids.shape != counts.shape:
        raise ValueError(f"sampled ids {ids.shape} and counts {counts.shape} must both be [n, S]")
    _count_width(num_samples)
    valid = ids >= 0
    if (counts[~valid] != 0).any() or (counts[valid] < 1).any():
        raise ValueError("sampled counts must be >= 1 for every id and 0 in the -1 padding")
    if (counts.sum(1, dtype=np.int64) != num_samples).any():
        raise ValueError(f"sampled counts must sum to num_samples={num_samples} in every row")
    key = np.where(valid, ids.astype(np.int64), np.iinfo(np.int64).max)  # padding sorts last
    sorted_ids, cnt = _sort_rows(key, counts.astype(np.int64))
    m = valid.sum(1)
    valid = np.arange(ids.shape[1])[None, :] < m[:, None]
    return cnt, m, valid, _check_ids(sorted_ids, sorted_ids, valid, vocab_size, "sampled")


def encode_sampled(ids: np.ndarray, counts: np.ndarray, num_samples: int, vocab_size: int) -> np.ndarray:
    """One sequence's sampled targets -> 1-D uint8 blob, lossless.

    ids [n, S] integer: distinct sampled ids per row, padded with -1 (any order, any S); counts [n, S] integer:
    their counts, 0 in padding, each row summing to num_samples."""
    width_m = _count_width(num_samples)
    cnt, m, valid, gaps = sampled_rows(ids, counts, num_samples, vocab_size)
    cm1 = np.where(valid, cnt - 1, 0)
    k_id = best_k(gaps, valid, _id_k_max(vocab_size), True)
    k_ct = best_k(cm1, valid, (1 << AUX_K_BITS) - 1, True)
    params = (k_id | (k_ct << ID_K_BITS)).astype(np.uint8)
    sizes = pack_fields(m - 1, np.full(len(m), width_m))
    streams = [(gaps[valid], np.repeat(k_id, m), True), (cm1[valid], np.repeat(k_ct, m), True)]
    return make_blob(KIND_SAMPLED, [params, sizes, *pack_streams(streams)])


def decode_sampled(blob: np.ndarray, n: int, num_samples: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob -> (ids [n, num_samples] int64 ascending per row, padded with -1; counts [n, num_samples] int32, 0 in
    padding). Raises CodecError when the blob is not a valid sampled blob of that shape, N and vocabulary."""
    width_m = _count_width(num_samples)
    reader = BlobReader(blob, KIND_SAMPLED, "sampled")
    if reader.param != 0:
        raise CodecError(f"sampled blob has header parameter {reader.param}, not 0: corrupt")
    params = reader.take(n).astype(np.int64)
    k_id, k_ct = params & ((1 << ID_K_BITS) - 1), params >> ID_K_BITS
    m = reader.fields(np.full(n, width_m, np.int64)).astype(np.int64) + 1
    if n and int(m.max()) > num_samples:
        raise CodecError(f"sampled blob claims {int(m.max())} distinct ids at a position, more than N={num_samples}")
    total = int(m.sum())
    gaps, cm1 = reader.streams([(np.repeat(k_id, m), True), (np.repeat(k_ct, m), True)])
    rows = np.repeat(np.arange(n), m)
    cols = np.arange(total) - np.repeat(np.cumsum(m) - m, m)
    steps = np.zeros((n, num_samples), np.int64)
    counts = np.zeros((n, num_samples), np.int64)
    steps[rows, cols] = gaps + 1
    counts[rows, cols] = cm1 + 1
    if total and int(gaps.max()) >= vocab_size:
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
