"""Format-3 compact encodings of one sequence's teacher targets and token offsets: plain little-endian arrays in one
zstd frame per blob, framed and bound to the row's global sequence index by `cache_tools.format.codec_frame`.

The numbers are exactly those of the format-2 bit coder (`cache_tools.format.codec`): the same 7-bit companded
log-prob levels (`codec.quantise_logprobs`) and the same ids, so a cache converted between the two decodes to
identical arrays. Only the packing differs: zstd over byte planes decodes much faster than numpy bit unpacking and,
over a whole window, stores fewer bytes (see docs/RESULTS.md for the measured table).

Payloads ("wide" = `codec_frame.split_wide`: 16-bit values as a low and a high byte plane, larger ones escaped):

- top-k (kind T, header parameter = level bits): n uint32, K uint16, row maxima float32 [n], row ranges uint8 [n],
  wide(id steps) [n * K] (ids ascending per row; a row's first step is its first id, so ids = cumsum of steps),
  levels uint8 [n * K] in that id order.
- sampled (kind S): n uint32, wide(distinct ids - 1) [n], wide(id steps) [total], wide(count - 1) [total].
- offsets (kind O, parameter = flags as in `codec_offsets`): n uint32, length base uint32, wide(lengths - base) [n]
  (zigzag when SIGNED_LENGTHS), then wide(zigzag(gap)) [n] unless NO_GAPS.

`n` is the number of rows the blob holds: every valid position, or only those a cache stores targets for (its
target mask), as the caller decides; a blob read with another count is refused.
"""

from __future__ import annotations

import struct

import numpy as np

from cache_tools.format.codec import (
    LEVEL_BITS,
    _check_ids,
    _count_width,
    _sort_rows,
    level_table,
    quantise_logprobs,
    sampled_rows,
)
from cache_tools.format.codec_frame import Payload, open_blob, seal, split_wide, wide_bound
from cache_tools.format.codec_offsets import (
    INT32,
    NO_GAPS,
    SIGNED_LENGTHS,
    _unzigzag,
    _zigzag,
    offset_streams,
)
from cache_tools.format.errors import CodecError

__all__ = ["encode_topk", "encode_topk_levels", "decode_topk", "encode_sampled", "decode_sampled", "encode_offsets",
           "decode_offsets", "topk_parts", "finish_topk", "LEVEL_BITS"]

KIND_TOPK, KIND_SAMPLED, KIND_OFFSETS = b"T", b"S", b"O"


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, *, sequence: int,
                level_bits: int = LEVEL_BITS) -> np.ndarray:
    """One sequence's top-k targets [n, K] (distinct ids per row, any order; log-probs, -inf allowed) -> blob bound
    to global sequence index `sequence`."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.ndim != 2 or ids.shape != logprobs.shape or ids.shape[1] < 1:
        raise ValueError(f"top-k ids {ids.shape} and logprobs {logprobs.shape} must both be [n, K] with K >= 1")
    if not 1 <= level_bits <= 8:
        raise ValueError(f"level_bits={level_bits} must lie in 1..8")
    if not 1 <= vocab_size <= 1 << 31:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, 2**31]")
    n, k = ids.shape
    if k >= 1 << 16:
        raise ValueError(f"top-k K={k} must be below 65,536")
    sorted_ids, lp = _sort_rows(ids.astype(np.int64), logprobs.astype(np.float32))
    _check_ids(ids, sorted_ids, np.ones(ids.shape, bool), vocab_size, "top-k")
    if np.isnan(lp).any():
        raise ValueError("top-k logprobs hold NaN")
    if n and not np.isfinite(lp.max(1)).all():
        raise ValueError("top-k logprobs: every row needs a finite maximum (a row is all -inf or holds +inf)")
    lp_max, ranges, levels = quantise_logprobs(lp, level_bits)
    return encode_topk_levels(sorted_ids, levels, lp_max, ranges, level_bits, sequence=sequence)


def encode_topk_levels(sorted_ids: np.ndarray, levels: np.ndarray, lp_max: np.ndarray, ranges: np.ndarray,
                       level_bits: int, *, sequence: int) -> np.ndarray:
    """Already quantised top-k targets (ids ascending per row [n, K], their levels, row maxima, range bytes) -> blob;
    what `encode_topk` writes, and how a format 2 blob (`codec.topk_levels`) is carried over exactly."""
    n, k = sorted_ids.shape
    steps = np.diff(sorted_ids, axis=1, prepend=0)  # a row's first step is its first id
    parts = [struct.pack("<IH", n, k), np.asarray(lp_max, "<f4").tobytes(), ranges.astype(np.uint8).tobytes(),
             *split_wide(steps), levels.astype(np.uint8).tobytes()]
    return seal(KIND_TOPK, b"".join(parts), sequence, level_bits)


def topk_parts(blob: np.ndarray, n: int, K: int, vocab_size: int, *,
               sequence: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The checked small arrays of a top-k blob, before the final step: (id steps [n, K], levels [n, K] uint8 in id
    order, row maxima float32 [n], range bytes [n] uint8, level bits). `finish_topk` turns them into what
    `decode_topk` returns. Steps are int32 when every cumulative sum fits, else int64."""
    level_bits, payload = open_blob(blob, KIND_TOPK, sequence, 6 + 5 * n + (wide_bound(n * K) + n * K))
    if not 1 <= level_bits <= 8:
        raise CodecError(f"top-k blob says {level_bits} level bits (1..8): corrupt")
    p = Payload(payload, "top-k")
    got_n, got_k = p.scalar("<u4"), p.scalar("<u2")
    if (got_n, got_k) != (n, K):
        raise CodecError(f"top-k blob holds {got_n} x {got_k} targets, the sequence needs {n} x {K}: another row's "
                         "blob, or another cache's")
    lp_max, ranges = p.take(n, "<f4"), p.take(n)
    # int32 when the running sum over the whole blob cannot overflow (rows are summed in one flat pass)
    steps = p.wide(n * K, np.int32 if n * vocab_size < 1 << 31 else np.int64).reshape(n, K)
    levels = p.take(n * K).reshape(n, K)
    p.finish()
    if n and int(levels.max()) >= 1 << level_bits:
        raise CodecError(f"top-k blob holds levels beyond its {level_bits} level bits: corrupt")
    if not np.isfinite(lp_max).all():
        raise CodecError("top-k blob holds a non-finite row maximum: corrupt")
    return steps, levels, lp_max, ranges, level_bits


def finish_topk(steps: np.ndarray, levels: np.ndarray, lp_max: np.ndarray, ranges: np.ndarray, level_bits: int,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`topk_parts` -> (ids [n, K] int64, logprobs [n, K] float32), each row by log-prob descending (ties: id order),
    identical to the format-2 decoder's output for the same targets."""
    n, K = steps.shape
    # One running sum over the whole blob (faster than a row-wise cumsum), less each row's starting total.
    ids = np.cumsum(steps.ravel()).reshape(n, K)
    if n > 1:
        ids[1:] -= ids[:-1, -1:].copy()
    if n and (int(ids[:, -1].max()) >= vocab_size or (K > 1 and int(steps[:, 1:].min()) < 1)):
        raise CodecError(f"top-k blob decodes to ids >= vocab_size={vocab_size} or repeated ids: corrupt, or another "
                         "vocabulary")
    shift = max(vocab_size - 1, 1).bit_length()
    if shift + level_bits <= 31:
        # Level 0 is the row maximum, so output order is (level, id) ascending: one int32 key per entry, sorted in
        # place (numpy's vectorised sort; measured cheaper than a stable argsort by level plus three gathers).
        key = levels.astype(np.int32)
        key <<= shift
        key |= ids.astype(np.int32, copy=False)
        key.sort(axis=1)
        cell = key >> shift
        cell += (ranges.astype(np.int32) << level_bits)[:, None]
        logprobs = level_table(level_bits).take(cell)
        np.subtract(lp_max[:, None], logprobs, out=logprobs)
        key &= (1 << shift) - 1
        return key.astype(np.int64), logprobs
    # Vocabularies too large for the packed key: a stable sort by level keeps id order among ties.
    flat = np.argsort(levels, axis=1, kind="stable")
    flat += np.arange(0, n * K, K)[:, None]
    cell = levels.take(flat).astype(np.int64)
    cell += (ranges.astype(np.int64) << level_bits)[:, None]
    logprobs = level_table(level_bits).take(cell)
    np.subtract(lp_max[:, None], logprobs, out=logprobs)
    return ids.take(flat).astype(np.int64, copy=False), logprobs


def decode_topk(blob: np.ndarray, n: int, K: int, vocab_size: int, *, sequence: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob of row `sequence` -> (ids [n, K] int64, logprobs [n, K] float32), rows by log-prob descending. Raises
    CodecError when it is not that row's valid top-k blob of that shape and vocabulary."""
    return finish_topk(*topk_parts(blob, n, K, vocab_size, sequence=sequence), vocab_size)


def encode_sampled(ids: np.ndarray, counts: np.ndarray, num_samples: int, vocab_size: int, *,
                   sequence: int) -> np.ndarray:
    """One sequence's sampled targets (ids [n, S] distinct per row, -1 padding; counts [n, S], 0 in padding, each
    row summing to num_samples) -> lossless blob bound to `sequence`."""
    cnt, m, valid, gaps = sampled_rows(ids, counts, num_samples, vocab_size)
    steps = gaps + 1
    steps[:, 0] -= 1  # the first id itself
    parts = [struct.pack("<I", ids.shape[0]), *split_wide(m - 1), *split_wide(steps[valid]),
             *split_wide(cnt[valid] - 1)]
    return seal(KIND_SAMPLED, b"".join(parts), sequence)


def decode_sampled(blob: np.ndarray, n: int, num_samples: int, vocab_size: int, *,
                   sequence: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob of row `sequence` -> (ids [n, num_samples] int64 ascending per row, -1 padding; counts [n, num_samples]
    int32, 0 in padding), as format 2 returns them. CodecError unless it is that row's valid sampled blob."""
    _count_width(num_samples)
    _, payload = open_blob(blob, KIND_SAMPLED, sequence, 4 + wide_bound(n) + 2 * wide_bound(n * num_samples))
    p = Payload(payload, "sampled")
    if p.scalar("<u4") != n:
        raise CodecError(f"sampled blob holds another number of rows than the sequence's {n}: another row's blob")
    m = p.wide(n) + 1
    if n and int(m.max()) > num_samples:
        raise CodecError(f"sampled blob claims {int(m.max())} distinct ids at a position, more than N={num_samples}")
    total = int(m.sum())
    id_steps, cm1 = p.wide(total), p.wide(total)
    p.finish()
    rows = np.repeat(np.arange(n), m)
    cols = np.arange(total) - np.repeat(np.cumsum(m) - m, m)
    steps = np.zeros((n, num_samples), np.int64)
    counts = np.zeros((n, num_samples), np.int64)
    steps[rows, cols] = id_steps
    counts[rows, cols] = cm1 + 1
    if total and int(np.delete(id_steps, np.cumsum(m) - m).min(initial=1)) < 1:
        raise CodecError("sampled blob decodes to repeated ids at a position: corrupt")
    ids = np.where(counts > 0, np.cumsum(steps, axis=1), -1)
    if total and int(ids.max()) >= vocab_size:
        raise CodecError(f"sampled blob decodes to ids >= vocab_size={vocab_size}: corrupt, or another vocabulary")
    if (counts.sum(1) != num_samples).any():
        raise CodecError(f"sampled blob decodes to counts that do not sum to N={num_samples}: corrupt")
    return ids, counts.astype(np.int32)


def encode_offsets(offsets: np.ndarray, *, sequence: int) -> np.ndarray:
    """One sequence's token offsets [n, 2] (integers within int32) -> lossless blob bound to `sequence`."""
    gap, length, flags, base = offset_streams(offsets)
    parts = [struct.pack("<II", offsets.shape[0], base), *split_wide(length)]
    if (gap != 0).any():
        parts.extend(split_wide(_zigzag(gap)))
    else:
        flags |= NO_GAPS
    return seal(KIND_OFFSETS, b"".join(parts), sequence, flags)


def decode_offsets(blob: np.ndarray, n: int, *, sequence: int) -> np.ndarray:
    """Blob of row `sequence` -> offsets [n, 2] int32 exactly as encoded; CodecError otherwise."""
    flags, payload = open_blob(blob, KIND_OFFSETS, sequence, 8 + 2 * wide_bound(n))
    if flags & ~(SIGNED_LENGTHS | NO_GAPS):
        raise CodecError(f"token-offsets blob has header parameter {flags} (flags 0..3): corrupt")
    p = Payload(payload, "token-offsets")
    count, base = p.scalar("<u4"), p.scalar("<u4")
    if count != n:
        raise CodecError(f"token-offsets blob holds {count} tokens, the sequence has {n}: another row's blob")
    length = p.wide(n)
    gap = np.zeros(n, np.int64) if flags & NO_GAPS else _unzigzag(p.wide(n))
    p.finish()
    length = _unzigzag(length) if flags & SIGNED_LENGTHS else length + base
    end = np.cumsum(gap + length)
    out = np.stack([end - length, end], axis=1)
    if n and (int(out.min()) < INT32.min or int(out.max()) > INT32.max):
        raise CodecError("token-offsets blob decodes to offsets outside int32: corrupt")
    return out.astype(np.int32)
