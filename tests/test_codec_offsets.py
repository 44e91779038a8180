"""cache_tools.format.codec_offsets (token offsets of compact caches): lossless round trip on random, tokenizer-like and
adversarial offsets (overlapping tokens, empty tokens, the int32 extremes, n = 0 / 1), bad input refused, and every
corrupt blob refused with CodecError (never decoded into other offsets)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from test_codec import corrupt_variants

from cache_tools.format import codec
from cache_tools.format.codec import check_offsets, decode_offsets, encode_offsets, encode_sampled
from cache_tools.format.codec_offsets import NO_GAPS, SIGNED_LENGTHS
from cache_tools.format.errors import CodecError

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def tokenizer_like(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 2] offsets as a byte-level BPE tokenizer gives them over one window: contiguous tokens of 1..12
    characters, some pairs sharing one character (a split multi-byte character), EOS-like empty tokens."""
    lengths = rng.integers(1, 13, n)
    starts = np.cumsum(lengths) - lengths
    offsets = np.stack([starts, starts + lengths], axis=1)
    shared = rng.random(n) < 0.05  # token i repeats token i - 1's last character
    for i in np.flatnonzero(shared[1:]) + 1:
        offsets[i] = (offsets[i - 1, 1] - 1, offsets[i - 1, 1])
    empty = rng.random(n) < 0.02
    offsets[empty] = offsets[empty, :1]  # start == end
    return offsets


def assert_roundtrip(offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets)
    blob = encode_offsets(offsets)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    got = decode_offsets(blob, len(offsets))
    assert got.dtype == np.int32 and got.shape == (len(offsets), 2) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, offsets)
    check_offsets(blob, len(offsets))
    return blob


@pytest.mark.parametrize("n", [0, 1, 2, 37, 512, 4096])
def test_roundtrip_tokenizer_like(n):
    rng = np.random.default_rng(n)
    offsets = tokenizer_like(rng, n)
    blob = assert_roundtrip(offsets)
    assert not blob[4] & SIGNED_LENGTHS, "well-formed offsets (end >= start) use the unsigned length stream"
    if n >= 512:  # the point of the codec: under a byte per token instead of 8 (lengths uniform in 1..12 here)
        assert blob.size < 1.0 * n, blob.size / n


def test_contiguous_tokens_store_no_gaps():
    """The common window (tokens tile the text, no empty token): no gap stream, lengths above the shortest."""
    lengths = np.random.default_rng(1).integers(1, 9, 512)
    ends = np.cumsum(lengths)
    offsets = np.stack([ends - lengths, ends], axis=1)
    blob = assert_roundtrip(offsets)
    assert blob[4] == NO_GAPS
    assert blob.size < 0.6 * 512, blob.size  # ~4.4 bits per token for lengths uniform in 1..8 (the gaps: 0)
    with_gap = offsets.copy()
    with_gap[100:] += 1  # one skipped character
    assert assert_roundtrip(with_gap)[4] == 0 and encode_offsets(with_gap).size > blob.size


def test_roundtrip_builder_windows_with_split_characters(tokenizer, corpus):
    """The builder's own windows (byte-level BPE over text with multi-byte characters, EOS between documents):
    tokens that share a character give negative gaps, and every window round-trips."""
    from cache_tools.format.text_data import pack_windows

    docs = [corpus[0][:300], "Grüße aus Köln, naïve café, 東京は晴れ 🙂🙂 Ελληνικά " * 6, corpus[1][:200]]
    windows = list(pack_windows(tokenizer, enumerate(docs), 64))
    negative = 0
    for window in windows:
        assert_roundtrip(window.offsets)
        negative += int((window.offsets[1:, 0] < window.offsets[:-1, 1]).sum())
    assert len(windows) > 3 and negative > 0


@pytest.mark.parametrize("n", [1, 3, 100])
def test_roundtrip_random_int32(n):
    rng = np.random.default_rng(100 + n)
    offsets = rng.integers(I32_MIN, I32_MAX, size=(n, 2), endpoint=True, dtype=np.int64)
    blob = assert_roundtrip(offsets)
    assert blob[4] & SIGNED_LENGTHS == (SIGNED_LENGTHS if (offsets[:, 1] < offsets[:, 0]).any() else 0)


@pytest.mark.parametrize("offsets", [
    [[0, 0]],  # a special token alone
    [[0, 0], [0, 0], [0, 5], [5, 5], [5, 9]],  # special tokens at (0, 0), empty tokens mid-text
    [[3, 4], [3, 4], [3, 4], [4, 7]],  # three tokens sharing one character: negative gaps
    [[10, 12], [2, 3], [100, 101]],  # going back and jumping forward
    [[I32_MAX, I32_MAX]],  # the largest offset, first token (gap 2**31 - 1)
    [[0, I32_MAX], [I32_MAX, I32_MAX], [0, 1]],  # longest token, then a gap of -(2**31 - 1)
    [[I32_MIN, I32_MAX], [I32_MAX, I32_MIN]],  # extremes both ways: lengths +-(2**32 - 1), signed stream
    [[5, 3]],  # end < start: kept exactly (verify reports it; the codec is lossless)
    [[I32_MIN, I32_MIN], [I32_MAX, I32_MAX], [I32_MIN, I32_MIN]],  # gaps of +-(2**32 - 1)
])
def test_roundtrip_adversarial(offsets):
    assert_roundtrip(np.array(offsets, np.int64).reshape(-1, 2))


def test_any_integer_dtype_and_int32_input():
    offsets = tokenizer_like(np.random.default_rng(3), 50)
    blobs = {dtype: encode_offsets(offsets.astype(dtype)) for dtype in (np.int32, np.int64, np.uint16)}
    assert len({b.tobytes() for b in blobs.values()}) == 1, "the blob depends on the values only"


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3,), np.int32), r"\[n, 2\]"),
    (np.zeros((3, 3), np.int32), r"\[n, 2\]"),
    (np.zeros((3, 2), np.float32), "integer"),
    (np.array([[0, 2**31]]), "int32"),
    (np.array([[-(2**31) - 1, 0]]), "int32"),
])
def test_encode_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        encode_offsets(bad)


def test_corrupt_blobs_raise_codec_error():
    offsets = tokenizer_like(np.random.default_rng(9), 40)
    blob = encode_offsets(offsets)
    for name, bad in corrupt_variants(blob).items():
        with pytest.raises(CodecError):
            decode_offsets(bad, 40)
        with pytest.raises(CodecError):
            check_offsets(bad, 40)
        assert name
    for n in (0, 39, 41):  # read with another token count
        with pytest.raises(CodecError):
            decode_offsets(blob, n)
    with pytest.raises(CodecError, match="not a token-offsets blob"):
        decode_offsets(encode_sampled(np.array([[3]]), np.array([[4]]), 4, 10), 1)
    with pytest.raises(CodecError, match="not a sampled"):
        codec.decode_sampled(blob, 40, 4, 10)


def _reseal(bad: np.ndarray) -> np.ndarray:
    """The same bytes behind a recomputed checksum: damage the crc cannot catch."""
    size = codec.HEADER.size
    head, body = bad[: size - 4].tobytes(), bad[size:].tobytes()
    return np.frombuffer(head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body, np.uint8)


def test_resealed_count_and_parameters_out_of_range_are_refused():
    offsets = np.stack([np.arange(20) * 3, np.arange(20) * 3 + 2], axis=1)  # lengths 2, gaps 1: base 2, flags 0
    blob = encode_offsets(offsets)
    size = codec.HEADER.size
    for pos, value, match in ((4, 4, "header parameter"), (size, 21, "holds 21 tokens, the sequence has 20"),
                              (size + 8, 25, "code parameters"), (size + 9, 200, "code parameters"),
                              (4, SIGNED_LENGTHS, "base 2 with flags 1"), (size + 4, 0, "")):
        bad = blob.copy()
        bad[pos] = value
        if not match:  # a valid blob of other offsets (base 0: empty tokens 1 apart): verify's range check is for that
            assert decode_offsets(_reseal(bad), 20).tolist() == [[i, i] for i in range(20)]
            continue
        with pytest.raises(CodecError, match=match):
            decode_offsets(_reseal(bad), 20)


def test_resealed_random_damage_is_refused_or_decodes_to_int32():
    """Bit flips and truncations behind a valid checksum: CodecError or int32 [n, 2], never another exception."""
    rng = np.random.default_rng(12)
    offsets = tokenizer_like(rng, 64)
    offsets[5] = (I32_MAX - 3, I32_MAX)  # wide fields in the blob too
    blob = encode_offsets(offsets)
    refused = 0
    for _ in range(300):
        bad = blob.copy()
        for pos in rng.integers(codec.HEADER.size, bad.size, rng.integers(1, 4)):
            bad[pos] ^= np.uint8(1 << int(rng.integers(0, 8)))
        if rng.random() < 0.2:
            bad = bad[: rng.integers(codec.HEADER.size, bad.size)]
        try:
            got = decode_offsets(_reseal(bad), 64)
            assert got.dtype == np.int32 and got.shape == (64, 2)
        except CodecError:
            refused += 1
    assert refused > 100, refused
