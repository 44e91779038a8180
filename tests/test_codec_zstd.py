"""format.codec_zstd (format 3 compact blobs): decodes to exactly what the format 2 bit coder decodes to (same
levels, same ids), lossless sampled targets and offsets, and every damaged blob refused with one CodecError line:
every single-bit flip, every truncation, a wrong codec id, and a blob read for another row (the checksum binds the
global sequence index)."""

from __future__ import annotations

import numpy as np
import pytest
from test_codec import random_topk

from cache_tools.format import codec, codec_frame, codec_zstd
from cache_tools.format.errors import CodecError

QWEN_ROWS = 151_936


def random_sampled(rng, n: int, N: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((n, N), -1, np.int64)
    counts = np.zeros((n, N), np.int32)
    for row in range(n):
        draws = rng.zipf(1.3, N) % vocab
        distinct, times = np.unique(draws, return_counts=True)
        ids[row, : distinct.size], counts[row, : distinct.size] = rng.permutation(distinct), times[:]
        counts[row, : distinct.size] = times[np.argsort(np.argsort(ids[row, : distinct.size]))]
    return ids, counts


@pytest.mark.parametrize("vocab, n, k, spread", [(300, 5, 7, 8.0), (65_536, 40, 64, 3.0), (QWEN_ROWS, 33, 256, 8.0),
                                                  (QWEN_ROWS, 0, 16, 1.0), (QWEN_ROWS, 3, 1, 1.0)])
def test_topk_decodes_exactly_as_format_2(vocab, n, k, spread):
    rng = np.random.default_rng(vocab + n + k)
    ids, lp = random_topk(rng, n, k, vocab, spread)
    if n and k > 1:
        ids[0, 0], lp[0, -1] = vocab - 1, -np.inf  # the last id; a -inf entry clipped as format 2 clips it
    old_ids, old_lp = codec.decode_topk(codec.encode_topk(ids, lp, vocab), n, k, vocab)
    blob = codec_zstd.encode_topk(ids, lp, vocab, sequence=12345)
    new_ids, new_lp = codec_zstd.decode_topk(blob, n, k, vocab, sequence=12345)
    assert new_ids.dtype == np.int64 and new_lp.dtype == np.float32
    np.testing.assert_array_equal(new_ids, old_ids)
    np.testing.assert_array_equal(new_lp.view(np.int32), old_lp.view(np.int32))  # bit-identical


def test_topk_escapes_far_ids_and_level_bits():
    ids = np.array([[0, 70_000, 151_935], [151_000, 5, 140_000]], np.int64)  # steps >= 2**16 are escaped
    lp = np.array([[-1.0, -2.0, -30.0], [-0.5, -0.7, -40.0]], np.float32)
    for bits in (1, 4, 8):
        want = codec.decode_topk(codec.encode_topk(ids, lp, QWEN_ROWS, level_bits=bits), 2, 3, QWEN_ROWS)
        got = codec_zstd.decode_topk(codec_zstd.encode_topk(ids, lp, QWEN_ROWS, sequence=0, level_bits=bits), 2, 3,
                                     QWEN_ROWS, sequence=0)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("vocab, N", [(50, 4), (QWEN_ROWS, 64), (1000, 300)])
def test_sampled_round_trip_is_lossless(vocab, N):
    rng = np.random.default_rng(N)
    ids, counts = random_sampled(rng, 30, N, vocab)
    blob = codec_zstd.encode_sampled(ids, counts, N, vocab, sequence=9)
    got_ids, got_counts = codec_zstd.decode_sampled(blob, 30, N, vocab, sequence=9)
    want_ids, want_counts = codec.decode_sampled(codec.encode_sampled(ids, counts, N, vocab), 30, N, vocab)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_counts, want_counts)
    assert got_counts.dtype == np.int32 and (got_counts.sum(1) == N).all()


@pytest.mark.parametrize("offsets", [
    np.stack([np.arange(50), np.arange(1, 51)], 1),  # contiguous: no gap stream
    np.array([[0, 0], [0, 3], [2, 3], [3, 3], [10, 2**31 - 1], [-5, -9], [2**31 - 1, -(2**31)]]),  # overlaps, signed
    np.zeros((0, 2), np.int64),
])
def test_offsets_round_trip_is_lossless(offsets):
    blob = codec_zstd.encode_offsets(offsets, sequence=4)
    got = codec_zstd.decode_offsets(blob, len(offsets), sequence=4)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, offsets)


def _blobs(rng) -> dict[str, tuple[np.ndarray, object]]:
    ids, lp = random_topk(rng, 6, 16, QWEN_ROWS)
    s_ids, s_counts = random_sampled(rng, 6, 16, QWEN_ROWS)
    offsets = np.stack([np.arange(6), np.arange(1, 7)], 1)
    return {
        "topk": (codec_zstd.encode_topk(ids, lp, QWEN_ROWS, sequence=77),
                 lambda b, s=77: codec_zstd.decode_topk(b, 6, 16, QWEN_ROWS, sequence=s)),
        "sampled": (codec_zstd.encode_sampled(s_ids, s_counts, 16, QWEN_ROWS, sequence=77),
                    lambda b, s=77: codec_zstd.decode_sampled(b, 6, 16, QWEN_ROWS, sequence=s)),
        "offsets": (codec_zstd.encode_offsets(offsets, sequence=77),
                    lambda b, s=77: codec_zstd.decode_offsets(b, 6, sequence=s)),
    }


@pytest.mark.parametrize("kind", ["topk", "sampled", "offsets"])
def test_every_bit_flip_and_truncation_is_refused(kind):
    blob, decode = _blobs(np.random.default_rng(0))[kind]
    decode(blob)  # the intact blob decodes
    bits = range(blob.size * 8) if blob.size <= 512 else np.random.default_rng(1).choice(blob.size * 8, 4096, False)
    for bit in bits:
        bad = blob.copy()
        bad[bit // 8] ^= np.uint8(1 << (bit % 8))
        with pytest.raises(CodecError) as info:
            decode(bad)
        assert "\n" not in str(info.value)
    for size in range(blob.size):
        with pytest.raises(CodecError):
            decode(blob[:size])
    with pytest.raises(CodecError):
        decode(np.concatenate([blob, np.zeros(1, np.uint8)]))


@pytest.mark.parametrize("kind", ["topk", "sampled", "offsets"])
def test_a_blob_read_for_another_row_is_refused(kind):
    blob, decode = _blobs(np.random.default_rng(0))[kind]
    for other in (0, 76, 78, 77 + (1 << 32)):
        with pytest.raises(CodecError, match="fails its checksum for sequence"):
            decode(blob, other)


def test_wrong_codec_id_is_refused():
    blobs = _blobs(np.random.default_rng(0))
    topk, decode_topk = blobs["topk"]
    with pytest.raises(CodecError, match="not a sampled blob"):
        blobs["sampled"][1](topk)
    with pytest.raises(CodecError, match="not a top-k blob"):
        decode_topk(blobs["offsets"][0])
    old = codec.encode_topk(np.array([[3, 5]]), np.array([[-1.0, -2.0]], np.float32), QWEN_ROWS)
    with pytest.raises(CodecError, match="codec version 1, format 3 caches hold version 2"):
        codec_zstd.decode_topk(old, 1, 2, QWEN_ROWS, sequence=0)
    with pytest.raises(CodecError, match="encoding version 2"):  # and the format 2 reader refuses format 3 blobs
        codec.decode_topk(topk, 6, 16, QWEN_ROWS)


def test_wrong_shape_or_vocabulary_is_refused():
    blob, _ = _blobs(np.random.default_rng(0))["topk"]
    with pytest.raises(CodecError, match="holds 6 x 16 targets"):
        codec_zstd.decode_topk(blob, 5, 16, QWEN_ROWS, sequence=77)
    with pytest.raises(CodecError, match="at most"):
        codec_zstd.decode_topk(blob, 6, 2, QWEN_ROWS, sequence=77)  # the payload cannot fit that shape
    with pytest.raises(CodecError, match="vocab_size=1000"):
        codec_zstd.decode_topk(blob, 6, 16, 1000, sequence=77)


def test_encoder_refuses_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        codec_zstd.encode_topk(np.array([[3, 3]]), np.array([[-1.0, -2.0]]), 10, sequence=0)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=10\)"):
        codec_zstd.encode_topk(np.array([[3, 10]]), np.array([[-1.0, -2.0]]), 10, sequence=0)
    with pytest.raises(ValueError, match="sequence index"):
        codec_zstd.encode_topk(np.array([[3]]), np.array([[-1.0]]), 10, sequence=-1)
    with pytest.raises(ValueError, match="sum to num_samples"):
        codec_zstd.encode_sampled(np.array([[3, -1]]), np.array([[2, 0]]), 3, 10, sequence=0)


def test_frame_header_layout():
    blob = codec_zstd.encode_offsets(np.zeros((1, 2), np.int64), sequence=0)
    magic, kind, version, _, _ = codec_frame.HEADER.unpack(blob[: codec_frame.HEADER.size].tobytes())
    assert (magic, kind, version[0]) == (b"DK", b"O", codec_frame.FRAME_VERSION)
