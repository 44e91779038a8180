"""Framing of format-3 compact blobs: a small header, a checksum that binds the blob to its row, and a zstd frame.

Layout of a blob (1-D uint8)::

    magic "DK" | kind (T top-k, S sampled, O offsets) | encoding version FRAME_VERSION | parameter byte | crc32
    zstd frame of the payload (the kind's plain arrays, see `cache_tools.format.codec_zstd`)

The crc32 covers the header's first five bytes, the GLOBAL SEQUENCE INDEX of the row the blob belongs to (uint64,
not stored: the reader supplies the index it is reading) and every byte of the zstd frame. So a blob copied or
swapped onto another row, any flipped bit (crc32 catches every 1-, 2- and 3-bit error and every burst up to 32 bits
in a blob this size), a truncated blob and a blob of another kind or codec version all fail here, before zstd sees
a byte, as one `CodecError` line; the reader adds shard and sequence. zstd (the `zstandard` package) was chosen by
measurement against an HDF5 filter (hdf5plugin) and Blosc2 on the same arrays: see docs/RESULTS.md.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from cache_tools.format.errors import CodecError

MAGIC = b"DK"
FRAME_VERSION = 2  # the format-2 bit coder (`codec_bits`) wrote 1
HEADER = struct.Struct("<2sccBI")  # magic, kind, version, kind-specific parameter, crc32
ZSTD_LEVEL = 9  # lower levels cost bytes, higher ones much encoding time for little gain (docs/RESULTS.md)
KIND_NAMES = {b"T": "top-k", b"S": "sampled", b"O": "token-offsets", b"W": "window"}


def _zstd():  # noqa: ANN202 - the module; imported lazily: only compact caches need it
    import zstandard

    return zstandard


def _crc(head: bytes, sequence: int, body: np.ndarray | bytes) -> int:
    if sequence < 0:
        raise ValueError(f"sequence index must be >= 0, got {sequence}")
    return zlib.crc32(body, zlib.crc32(struct.pack("<Q", sequence), zlib.crc32(head)))


def _compress(payload: bytes) -> bytes:
    return _zstd().ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False).compress(payload)


def _framed(kind: bytes, body: bytes, sequence: int, param: int) -> np.ndarray:
    head = HEADER.pack(MAGIC, kind, bytes([FRAME_VERSION]), param, 0)[:-4]
    return np.frombuffer(head + struct.pack("<I", _crc(head, sequence, body)) + body, np.uint8)


def seal(kind: bytes, payload: bytes, sequence: int, param: int = 0) -> np.ndarray:
    """Compress `payload` and frame it as a blob of `kind` bound to global sequence index `sequence`."""
    return _framed(kind, _compress(payload), sequence, param)


def seal_parts(kind: bytes, payloads: list[bytes], sequence: int, param: int = 0) -> np.ndarray:
    """Like `seal`, one zstd frame per payload (data of different statistics compress better apart); every frame but
    the last is preceded by its size (uint32). All frames are under the one checksum."""
    frames = [_compress(p) for p in payloads]
    return _framed(kind, b"".join(struct.pack("<I", len(f)) + f for f in frames[:-1]) + frames[-1], sequence, param)


def _checked(blob: np.ndarray, kind: bytes, sequence: int) -> tuple[int, bytes]:
    """A blob's header and checksum checked for row `sequence` -> (parameter byte, compressed body)."""
    what = KIND_NAMES[kind]
    blob = np.asarray(blob)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CodecError(f"{what} blob must be 1-D uint8, got {blob.dtype} with shape {blob.shape}")
    if blob.size < HEADER.size:
        raise CodecError(f"{what} blob is {blob.size} bytes, shorter than its {HEADER.size}-byte header: truncated")
    raw = blob.tobytes()
    magic, got_kind, version, param, crc = HEADER.unpack(raw[: HEADER.size])
    if magic != MAGIC or got_kind != kind:
        raise CodecError(f"not a {what} blob (codec id {magic + got_kind!r}, expected {MAGIC + kind!r})")
    if version[0] != FRAME_VERSION:
        raise CodecError(f"{what} blob has codec version {version[0]}, format 3 caches hold version {FRAME_VERSION} "
                         "(a blob of another format: convert the cache with `cache_tools convert`)")
    body = raw[HEADER.size :]
    if _crc(raw[: HEADER.size - 4], sequence, body) != crc:
        raise CodecError(f"{what} blob fails its checksum for sequence {sequence}: corrupt, truncated, or another "
                         "row's blob")
    return param, body


def _inflate(body: bytes, what: str, max_payload: int) -> bytes:
    zstandard = _zstd()
    try:
        size = zstandard.frame_content_size(body)
        if not 0 <= size <= max_payload:
            raise CodecError(f"{what} blob claims {size} payload bytes (at most {max_payload} fit its shape): corrupt")
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=max_payload)
    except zstandard.ZstdError as err:
        raise CodecError(f"{what} blob is not a valid zstd frame ({err}): corrupt") from err


def open_blob(blob: np.ndarray, kind: bytes, sequence: int, max_payload: int) -> tuple[int, bytes]:
    """Check a blob's header and checksum for row `sequence`, then decompress it: -> (parameter byte, payload).
    `max_payload` bounds the decompressed size (what the caller's shape can need), so a forged size is refused
    before any allocation."""
    param, body = _checked(blob, kind, sequence)
    return param, _inflate(body, KIND_NAMES[kind], max_payload)


def open_parts(blob: np.ndarray, kind: bytes, sequence: int, max_payloads: list[int]) -> tuple[int, list[bytes]]:
    """`open_blob` for a blob written by `seal_parts` with len(max_payloads) payloads."""
    param, body = _checked(blob, kind, sequence)
    what, parts, pos = KIND_NAMES[kind], [], 0
    for i, bound in enumerate(max_payloads):
        end = len(body)
        if i < len(max_payloads) - 1:
            if pos + 4 > len(body) or pos + 4 + struct.unpack_from("<I", body, pos)[0] > len(body):
                raise CodecError(f"{what} blob's frame sizes exceed the blob: corrupt")
            pos, end = pos + 4, pos + 4 + struct.unpack_from("<I", body, pos)[0]
        parts.append(_inflate(body[pos:end], what, bound))
        pos = end
    return param, parts


class Payload:
    """Reads a decompressed payload front to back; every read past its end, and bytes left over, are CodecError."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.buf = np.frombuffer(payload, np.uint8)
        self.pos, self.what = 0, what

    def take(self, count: int, dtype: str = "u1") -> np.ndarray:
        nbytes = count * np.dtype(dtype).itemsize
        if count < 0 or self.pos + nbytes > self.buf.size:
            raise CodecError(f"{self.what} blob payload ends early ({self.buf.size} bytes): corrupt")
        out = self.buf[self.pos : self.pos + nbytes].view(dtype)
        self.pos += nbytes
        return out

    def scalar(self, dtype: str) -> int:
        return int(self.take(1, dtype)[0])

    def wide(self, count: int, dtype: type = np.int64) -> np.ndarray:
        """What `split_wide` wrote for `count` values: [count] of `dtype` (int32 only where the caller knows every
        value fits)."""
        lo, hi = self.take(count), self.take(count)
        values = np.empty(count, np.uint16)
        as_bytes = values.view(np.uint8)
        as_bytes[0::2], as_bytes[1::2] = lo, hi
        out = values.astype(dtype)
        escaped = np.flatnonzero(values == ESCAPE)
        extra = self.take(self.scalar("<u4"), "<u8")
        top = np.iinfo(dtype).max if dtype != np.int64 else (1 << 62) - 1
        if extra.size != escaped.size or (extra.size and (int(extra.min()) < ESCAPE or int(extra.max()) > top)):
            raise CodecError(f"{self.what} blob's escape list does not match its escaped values: corrupt")
        out[escaped] = extra.astype(np.int64)
        return out

    def finish(self) -> None:
        if self.pos != self.buf.size:
            raise CodecError(f"{self.what} blob has {self.buf.size - self.pos} payload bytes after its data: corrupt")


ESCAPE = 0xFFFF  # a 16-bit value of ESCAPE means: the value is the next one in the escape list


def split_wide(values: np.ndarray) -> list[bytes]:
    """Non-negative int64 [m] -> [low bytes, high bytes, escape count uint32, escapes uint64]: each value as 16
    bits split into two byte planes (zstd finds the structure of each plane; the high plane of small values is all
    zeros and costs nothing), values >= ESCAPE moved to an escape list."""
    values = np.asarray(values, np.int64).ravel()
    escaped = values >= ESCAPE
    as16 = np.where(escaped, ESCAPE, values).astype("<u2").view(np.uint8)
    extra = values[escaped].astype("<u8")
    return [as16[0::2].tobytes(), as16[1::2].tobytes(), struct.pack("<I", extra.size), extra.tobytes()]


def wide_bound(count: int) -> int:
    """Most payload bytes `split_wide` can write for `count` values."""
    return 2 * count + 4 + 8 * count
