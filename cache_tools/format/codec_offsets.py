"""Compact, LOSSLESS per-sequence encoding of teacher token offsets (format v2, encoding "compact").

One sequence of n tokens has offsets [n, 2]: (start, end) character offsets of each token in the window's text.
Stored as int32 that is 8 bytes per token; here it is ~3-4 bits (measured on Qwen3 and SmolLM2 tokenizers). Per
token two signed numbers are coded:

- gap = start - previous end (previous end = 0 before the first token): 0 for contiguous text, positive where text
  is skipped, NEGATIVE where two tokens overlap (byte-level BPE splits one character over two tokens, which then
  share its offsets). Zigzag-mapped (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...). When every gap of the sequence is 0
  (the common case: a window's tokens tile its text) the stream is left out (header flag `NO_GAPS`).
- length = end - start: >= 0 for every offset a tokenizer gives (0 for special tokens, e.g. (0, 0)). Coded as
  length - the sequence's shortest length (a uint32 base; most windows have no empty token, so this saves ~0.5
  bit per token). If some length is negative, zigzag-mapped instead, base 0 (header flag `SIGNED_LENGTHS`): any
  int32 pairs round-trip and well-formed ones pay nothing for it.

Each stream is Exp-Golomb-coded (`codec_bits`; robust to the odd very long token) with one parameter per
sequence (`best_k`). Layout after the header (whose parameter byte holds the flags): the token count n (uint32: a
blob read for a sequence of another length is refused, not decoded into shifted offsets), the length base (uint32),
k of the gaps, k of the lengths (one byte each), the unary section (byte count uint32 + the section) and the fields.
Int32 gaps span 33 bits, so a field may be wider than `codec_bits.MAX_FIELD_BITS` (up to MAX_BITS = 33; read in two
parts). Every reader-side fault raises `CodecError`, one line: a checksum covers every byte, and decoded offsets
outside int32 are refused.
"""

from __future__ import annotations

import numpy as np

from cache_tools.format.codec_bits import BlobReader, best_k, make_blob, pack_streams
from cache_tools.format.errors import CodecError

__all__ = ["KIND_OFFSETS", "SIGNED_LENGTHS", "NO_GAPS", "encode_offsets", "decode_offsets", "check_offsets"]

KIND_OFFSETS = b"O"
SIGNED_LENGTHS = 1  # header parameter bit: the lengths stream is zigzag-mapped (some end < start), base 0
NO_GAPS = 2  # header parameter bit: every gap is 0, the gap stream is left out
K_MAX = 24  # largest Exp-Golomb parameter (values reach 2**33: k = 24 still leaves them a short unary part)
# Widest field: a zigzagged int32 difference is < 2**33; + 2**K_MAX it stays < 2**34, so at most 33 field bits.
MAX_BITS = 33
INT32 = np.iinfo(np.int32)


def _zigzag(values: np.ndarray) -> np.ndarray:
    """int64 (|v| < 2**62) -> non-negative int64: 0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ..."""
    return (values << 1) ^ (values >> 63)


def _unzigzag(values: np.ndarray) -> np.ndarray:
    return (values >> 1) ^ -(values & 1)


def _gaps_lengths(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """offsets [n, 2] int64 -> (gap [n], length [n]) int64, both signed."""
    start, end = offsets[:, 0], offsets[:, 1]
    previous_end = np.concatenate([np.zeros(1, np.int64), end])[:-1]  # n = 0 gives empty arrays
    return start - previous_end, end - start


def offset_streams(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Checked offsets [n, 2] -> what both compact codecs store: (gaps [n], lengths [n] above `base` or zigzagged
    when some are negative, flags (SIGNED_LENGTHS or 0), base)."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 2 or offsets.shape[1] != 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be an integer array [n, 2], got {offsets.dtype} with shape {offsets.shape}")
    if offsets.size and (int(offsets.min()) < INT32.min or int(offsets.max()) > INT32.max):
        raise ValueError(f"offsets must fit int32; got {int(offsets.min())}..{int(offsets.max())}")
    gap, length = _gaps_lengths(offsets.astype(np.int64))
    flags, base = 0, 0
    if (length < 0).any():
        flags, length = SIGNED_LENGTHS, _zigzag(length)
    elif length.size:
        base = int(length.min())  # <= 2**32 - 1: fits its uint32
        length = length - base
    return gap, length, flags, base


def encode_offsets(offsets: np.ndarray) -> np.ndarray:
    """One sequence's token offsets [n, 2] (integers within int32; n may be 0) -> 1-D uint8 blob, lossless."""
    gap, length, flags, base = offset_streams(offsets)
    streams = [length]
    if (gap != 0).any():
        streams.insert(0, _zigzag(gap))
    else:
        flags |= NO_GAPS
    ks = [int(best_k(values[None, :], None, K_MAX, True)[0]) for values in streams]
    coded = pack_streams([(values, np.full(values.size, k), True) for values, k in zip(streams, ks, strict=True)])
    head = np.array([offsets.shape[0], base], "<u4").view(np.uint8)
    params = np.array([0, *ks] if flags & NO_GAPS else ks, np.uint8)
    return make_blob(KIND_OFFSETS, [head, params, *coded], flags)


def decode_offsets(blob: np.ndarray, n: int) -> np.ndarray:
    """Blob -> offsets [n, 2] int32, exactly as encoded. Raises CodecError when the blob is not a valid offsets blob
    of n tokens (truncated, corrupt, another kind, or written for another length)."""
    reader = BlobReader(blob, KIND_OFFSETS, "token-offsets")
    flags = reader.param
    if flags & ~(SIGNED_LENGTHS | NO_GAPS):
        raise CodecError(f"token-offsets blob has header parameter {flags} (flags 0..3): corrupt")
    count, base = (int(v) for v in reader.take(8).view("<u4"))
    if count != n:
        raise CodecError(f"token-offsets blob holds {count} tokens, the sequence has {n}: corrupt, or another's blob")
    k_gap, k_len = (int(k) for k in reader.take(2))
    if max(k_gap, k_len) > K_MAX or (flags & NO_GAPS and k_gap) or (flags & SIGNED_LENGTHS and base):
        raise CodecError(f"token-offsets blob has code parameters {k_gap}, {k_len}, base {base} with flags {flags}: "
                         "corrupt")
    if flags & NO_GAPS:
        (length,) = reader.streams([(np.full(n, k_len), True)], MAX_BITS)
        gap = np.zeros(n, np.int64)
    else:
        gap, length = reader.streams([(np.full(n, k_gap), True), (np.full(n, k_len), True)], MAX_BITS)
        gap = _unzigzag(gap)
    length = _unzigzag(length) if flags & SIGNED_LENGTHS else length + base
    # start_i = gap_i + end_{i-1} and end_i = start_i + length_i, so end = cumsum(gap + length); int64 cannot
    # overflow (n * 2**35 is far below 2**63 for any n a blob can hold).
    end = np.cumsum(gap + length)
    start = end - length
    out = np.stack([start, end], axis=1)
    if n and (int(out.min()) < INT32.min or int(out.max()) > INT32.max):
        raise CodecError("token-offsets blob decodes to offsets outside int32: corrupt")
    return out.astype(np.int32)


def check_offsets(blob: np.ndarray, n: int) -> None:
    """Raise CodecError unless `blob` decodes to the offsets of n tokens (what `verify` runs)."""
    decode_offsets(blob, n)
