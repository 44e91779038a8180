"""Bit-level building blocks of `codec` (vectorised numpy): fixed-width fields, unary numbers, per-row
Rice parameters, and the blob framing (header with magic, kind, version, one parameter byte and a crc32).

Rice coding of a value v >= 0 with parameter k: the quotient v >> k in unary (that many ones, then a zero) and the
low k bits as a fixed-width field. A blob keeps all remainders in one bit-packed section and all quotients in one
unary section, so both decode with whole-array operations (no per-value Python loop).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from cache_tools.format.errors import CodecError

ENCODING_VERSION = 1
MAGIC = b"DK"
HEADER = struct.Struct("<2sccBI")  # magic, kind, version, kind-specific parameter, crc32 of all other bytes
MAX_FIELD_BITS = 25  # widest fixed-width field the 4-byte window reader handles (25 + 7 bit offset <= 32)
MAX_WIDE_BITS = 2 * MAX_FIELD_BITS  # widest field a stream may hold: read as a high and a low part (int32 offsets)



# ---- bit packing ------------------------------------------------------------------------------------------------


def pack_fields(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate values[i] in widths[i] bits (MSB first, widths <= MAX_FIELD_BITS) into bytes, zero-padded."""
    if values.size == 0:
        return np.zeros(0, np.uint8)
    words = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    bits = np.unpackbits(words, axis=1)  # [M, 32], row-major order keeps the fields in sequence
    keep = np.arange(32)[None, :] >= (32 - widths.astype(np.int64))[:, None]
    return np.packbits(bits[keep])  # (measured faster than OR-reducing shifted windows per byte)


def read_fields(buf: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The consecutive fields of `widths` bits each (<= MAX_FIELD_BITS) packed in `buf` by `pack_fields`, uint32."""
    w32 = widths.astype(np.uint32)
    # uint32 arithmetic in place (twice as fast as int64 here); the bit offsets need 64 bits only for huge blobs
    offsets = np.cumsum(w32, dtype=np.uint64 if buf.size >= (1 << 28) else np.uint32)
    offsets -= w32
    padded = np.concatenate([buf, np.zeros(4, np.uint8)])
    # Every byte offset seen as the start of a big-endian uint32 (an overlapping strided view, no copy): one gather
    # per field instead of four byte gathers and shifts.
    words = np.ndarray(shape=(buf.size + 1,), dtype=">u4", buffer=padded, strides=(1,))  # + 1: 0-bit fields at the end
    window = words.take(offsets >> 3).astype(np.uint32)
    window <<= (offsets & 7).astype(np.uint32)
    window >>= 32 - w32  # a shift by 32 is undefined: 0-bit fields are zeroed below
    window[w32 == 0] = 0
    return window


def split_wide(values: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields of up to MAX_WIDE_BITS bits -> twice as many fields of at most MAX_FIELD_BITS each: per field its
    high part (width - MAX_FIELD_BITS bits, 0 for narrow fields) then its low part. Packed MSB first, the pair is
    bit for bit the wide field, so the layout of a blob does not depend on this split."""
    widths = widths.astype(np.int64)
    low = np.minimum(widths, MAX_FIELD_BITS)
    values = values.astype(np.int64)
    pairs = np.stack([values >> low, values & ((np.int64(1) << low) - 1)], axis=1).reshape(-1)
    return pairs, np.stack([widths - low, low], axis=1).reshape(-1)


def pack_unary(q: np.ndarray) -> np.ndarray:
    """q[i] ones then a zero, for every i, packed MSB first."""
    ends = np.cumsum(q.astype(np.int64) + 1) - 1
    bits = np.ones(int(ends[-1]) + 1 if q.size else 0, np.uint8)
    bits[ends] = 0
    return np.packbits(bits)


def read_unary(buf: np.ndarray, count: int) -> np.ndarray:
    """The `count` unary numbers in `buf`; CodecError unless they end within its last byte."""
    zeros = np.flatnonzero(np.unpackbits(buf) == 0)
    if zeros.size < count:
        raise CodecError(f"unary section holds {zeros.size} of the {count} numbers it should: corrupt or truncated")
    if count == 0:
        if buf.size:
            raise CodecError(f"unary section is {buf.size} bytes but holds nothing: corrupt")
        return np.zeros(0, np.int64)
    zeros = zeros[:count]
    if (int(zeros[-1]) >> 3) + 1 != buf.size:
        raise CodecError(f"unary section is {buf.size} bytes but its data ends in byte {int(zeros[-1]) >> 3}")
    return np.diff(zeros, prepend=-1) - 1


# ---- Rice and Exp-Golomb codes of non-negative ints ---------------------------------------------------------------
# Both write a value as a unary part plus a fixed-width field; a blob keeps all unary parts in one section and all
# fields in another. Rice(k): unary v >> k, field the low k bits (best for geometric values: levels). Exp-Golomb(k):
# v' = v + 2**k has b = bit_length(v') - 1 >= k bits below its leading one: unary b - k, field those b bits (cost
# grows with log v, so it suits heavy-tailed values: the id gaps of a teacher's support, dense among frequent low ids
# and sparse above, cost ~20% fewer bits than Rice on the benchmark's Qwen-vocabulary rows).


def _bit_length(values: np.ndarray) -> np.ndarray:
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)  # exact for ints < 2**53


def code_cost(values: np.ndarray, k: int, exp_golomb: bool) -> np.ndarray:
    """Bits per value [...] of coding `values` with parameter k."""
    if exp_golomb:
        return 2 * _bit_length(values + (1 << k)) - k - 1
    return (values >> k) + k + 1


def best_k(values: np.ndarray, valid: np.ndarray | None, k_max: int, exp_golomb: bool) -> np.ndarray:
    """Per row of values [n, m] (>= 0; entries where `valid` is False are ignored), the k in 0..k_max with the
    fewest bits (Exp-Golomb: counted from a per-row histogram of bit lengths, ignoring the rare carry of v + 2**k
    into a new bit, so the choice may be off by a bit or so, never wrong)."""
    n = values.shape[0]
    ks = np.arange(k_max + 1)
    if exp_golomb:
        lengths = _bit_length(values)  # 0..MAX_FIELD_BITS
        rows = np.broadcast_to(np.arange(n)[:, None], values.shape)
        keep = np.ones(values.shape, bool) if valid is None else valid
        hist = np.bincount((rows * 64 + lengths)[keep], minlength=n * 64).reshape(n, 64).astype(np.float64)
        per_length = 2 * np.maximum(np.arange(64)[:, None], ks[None, :] + 1) - ks[None, :] - 1  # [64, k]
        costs = hist @ per_length
    else:
        costs = np.stack([(np.where(valid, code_cost(values, int(k), False), 0) if valid is not None
                           else code_cost(values, int(k), False)).sum(1) for k in ks], axis=1)
    return costs.argmin(1).astype(np.int64) if n else np.zeros(0, np.int64)


def split_codes(values: np.ndarray, ks: np.ndarray, exp_golomb: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat values, each with its own k -> (unary parts, field values, field widths)."""
    if exp_golomb:
        shifted = values + (np.int64(1) << ks)
        bits = _bit_length(shifted) - 1
        return bits - ks, shifted - (np.int64(1) << bits), bits
    return values >> ks, values & ((np.int64(1) << ks) - 1), ks


def join_codes(unary: np.ndarray, fields: np.ndarray, widths: np.ndarray, ks: np.ndarray,
               exp_golomb: bool) -> np.ndarray:
    """Inverse of `split_codes` (widths must be those `field_widths` gives for the same unary parts)."""
    if exp_golomb:
        return (np.int64(1) << widths) + fields - (np.int64(1) << ks)
    return (unary << ks) | fields


def field_widths(unary: np.ndarray, ks: np.ndarray, exp_golomb: bool) -> np.ndarray:
    return unary + ks if exp_golomb else ks


class BlobReader:
    """Walks a blob: header check, then plain sections, then the field and unary sections."""

    def __init__(self, blob: np.ndarray, kind: bytes, what: str) -> None:
        blob = np.asarray(blob)
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise CodecError(f"{what} blob must be 1-D uint8, got {blob.dtype} with shape {blob.shape}")
        if blob.size < HEADER.size:
            raise CodecError(f"{what} blob is {blob.size} bytes, shorter than its {HEADER.size}-byte header")
        magic, got_kind, version, self.param, crc = HEADER.unpack(blob[: HEADER.size].tobytes())
        if magic != MAGIC or got_kind != kind:
            raise CodecError(f"not a {what} blob (header {magic + got_kind!r}, expected {MAGIC + kind!r})")
        if version[0] != ENCODING_VERSION:
            raise CodecError(f"{what} blob has encoding version {version[0]}; this reader knows {ENCODING_VERSION}")
        self.body = blob[HEADER.size :]
        if zlib.crc32(self.body, zlib.crc32(blob[: HEADER.size - 4])) != crc:
            raise CodecError(f"{what} blob fails its checksum: corrupt")
        self.pos, self.what = 0, what

    def take(self, nbytes: int) -> np.ndarray:
        if self.pos + nbytes > self.body.size:
            raise CodecError(f"{self.what} blob truncated: needs more than its {self.body.size + HEADER.size} bytes")
        out = self.body[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def fields(self, widths: np.ndarray, max_bits: int = MAX_FIELD_BITS) -> np.ndarray:
        """The next fields section: one field per width (each <= max_bits <= MAX_WIDE_BITS, else CodecError)."""
        widest = int(widths.max()) if widths.size else 0
        if widest > max_bits:
            raise CodecError(f"{self.what} blob asks for a {widest}-bit field: corrupt")
        section = self.take((int(widths.sum()) + 7) // 8)
        if widest <= MAX_FIELD_BITS:
            return read_fields(section, widths)
        _, split = split_wide(np.zeros(widths.size, np.int64), widths)
        pairs = read_fields(section, split).astype(np.int64).reshape(-1, 2)
        return (pairs[:, 0] << split[1::2]) | pairs[:, 1]

    def streams(self, specs: list[tuple[np.ndarray, bool]], max_bits: int = MAX_FIELD_BITS) -> list[np.ndarray]:
        """Decode what `pack_streams` wrote: one (per-value k, exp_golomb) per stream -> the streams' values. A
        field wider than `max_bits` (what the caller's values can need) is corrupt."""
        nbytes = int(self.take(4).view("<u4")[0])
        unary = read_unary(self.take(nbytes), sum(ks.size for ks, _ in specs))
        cuts = np.cumsum([0] + [ks.size for ks, _ in specs])
        parts = [unary[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        widths = [field_widths(u, ks, eg) for u, (ks, eg) in zip(parts, specs, strict=True)]
        fields = self.fields(np.concatenate(widths), max_bits)
        if self.pos != self.body.size:
            raise CodecError(f"{self.what} blob has {self.body.size - self.pos} bytes after its last field: corrupt")
        return [join_codes(u, fields[a:b], w, ks, eg)
                for u, w, a, b, (ks, eg) in zip(parts, widths, cuts[:-1], cuts[1:], specs, strict=True)]


def pack_streams(streams: list[tuple[np.ndarray, np.ndarray, bool]]) -> list[np.ndarray]:
    """(flat values, per-value k, exp_golomb) per stream -> blob parts: unary byte count (uint32), the unary section
    (read first: Exp-Golomb field widths depend on it), then the fields section (fields up to MAX_WIDE_BITS)."""
    split = [split_codes(v, ks, eg) for v, ks, eg in streams]
    unary = pack_unary(np.concatenate([u for u, _, _ in split]))
    values, widths = np.concatenate([f for _, f, _ in split]), np.concatenate([w for _, _, w in split])
    widest = int(widths.max()) if widths.size else 0
    if widest > MAX_WIDE_BITS:
        raise ValueError(f"a value needs a {widest}-bit field, more than the {MAX_WIDE_BITS} a blob may hold")
    if widest > MAX_FIELD_BITS:
        values, widths = split_wide(values, widths)
    fields = pack_fields(values, widths)
    return [np.array([unary.size], "<u4").view(np.uint8), unary, fields]


def make_blob(kind: bytes, parts: list[np.ndarray], param: int = 0) -> np.ndarray:
    body = np.concatenate([np.asarray(p, np.uint8).ravel() for p in parts])
    head = HEADER.pack(MAGIC, kind, bytes([ENCODING_VERSION]), param, 0)[:-4]
    header = head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head)))
    return np.concatenate([np.frombuffer(header, np.uint8), body])


