"""Format-3 compact encoding of what a window IS: its valid input ids and its text, one blob per sequence (kind W),
framed and bound to the row's global sequence index by `cache_tools.format.codec_frame` like the target blobs.
Compact caches whose manifest says ``window_encoding: compact`` store it instead of the ``input_ids`` and ``text``
datasets (`schema.DATASETS`).

Payload, two zstd frames under the blob's one checksum (ids and text have different statistics and compress better
apart):

1. n uint32, then the n ids as B byte planes (plane k holds byte k of every id, little-endian; B = the header's
   parameter, the fewest bytes that hold vocab_size - 1): the high planes of a large vocabulary are nearly constant.
2. the text as UTF-8 bytes (lone surrogates through "surrogatepass", NUL included, as the ``text`` dataset stores it).
"""

from __future__ import annotations

import struct

import numpy as np

from cache_tools.format.codec_frame import Payload, open_parts, seal_parts
from cache_tools.format.errors import CodecError

__all__ = ["encode_window", "decode_window", "id_bytes"]

KIND_WINDOW = b"W"
# Bounds the text a blob may claim before anything is allocated: far above any tokenizer's longest token.
TEXT_BYTES_PER_TOKEN = 4096


def id_bytes(vocab_size: int) -> int:
    """Bytes per stored id: the fewest that hold vocab_size - 1 (at least 1, at most 4)."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in 1..2**32, got {vocab_size}")
    return max(1, ((int(vocab_size) - 1).bit_length() + 7) // 8)


def _text_bytes(text: str | bytes | np.ndarray) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", errors="surrogatepass")
    return np.asarray(text, dtype=np.uint8).tobytes() if isinstance(text, np.ndarray) else bytes(text)


def encode_window(ids: np.ndarray, text: str | bytes | np.ndarray, vocab_size: int, *, sequence: int) -> np.ndarray:
    """A window's n valid input ids (each in [0, vocab_size)) and its text (str, or its UTF-8 bytes) -> blob bound
    to global sequence index `sequence`."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"input ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    B = id_bytes(vocab_size)
    planes = ids.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :B].T.tobytes()
    return seal_parts(KIND_WINDOW, [struct.pack("<I", ids.size) + planes, _text_bytes(text)], sequence, param=B)


def decode_window(blob: np.ndarray, n: int, vocab_size: int, *, sequence: int) -> tuple[np.ndarray, str]:
    """Blob of global sequence `sequence` -> (input ids int64 [n], text). Another row's blob, any damage, another
    count or a vocabulary the ids do not fit is a CodecError."""
    B = id_bytes(vocab_size)
    param, (id_part, text_part) = open_parts(blob, KIND_WINDOW, sequence,
                                             [4 + B * n, TEXT_BYTES_PER_TOKEN * (n + 1)])
    if param != B:
        raise CodecError(f"window blob holds {param}-byte ids, a vocabulary of {vocab_size} has {B}: another cache's "
                         "blob")
    payload = Payload(id_part, "window")
    count = payload.scalar("<u4")
    if count != n:
        raise CodecError(f"window blob holds {count} ids, the row has {n} valid positions")
    planes = payload.take(B * n).reshape(B, n)
    payload.finish()
    wide = np.zeros((n, 4), dtype=np.uint8)
    wide[:, :B] = planes.T
    ids = wide.view("<u4").reshape(n).astype(np.int64)
    if n and int(ids.max()) >= vocab_size:
        raise CodecError(f"window blob holds input id {int(ids.max())} >= vocab_size {vocab_size}: corrupt")
    return ids, text_part.decode("utf-8", errors="surrogatepass")
