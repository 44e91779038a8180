"""format.codec: compact top-k and lossless sampled blobs round-trip, adversarial shapes and values, and every
corrupt blob is refused with CodecError (never silently decoded into wrong targets)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from cache_tools.format import codec
from cache_tools.format.codec import check_sampled, check_topk, decode_sampled, decode_topk, encode_sampled, encode_topk
from cache_tools.format.errors import CodecError

QWEN_ROWS = 151_936  # > 2**16: ids need 18 bits


def random_topk(rng, n: int, k: int, vocab: int, spread: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] distinct ids and log-probs sorted descending, like a teacher's top-k."""
    ids = np.array([rng.choice(vocab, k, replace=False) for _ in range(n)], np.int64).reshape(n, k)
    lp = -np.sort(np.abs(rng.normal(0.0, spread, (n, k))), axis=1).astype(np.float32) - rng.uniform(0, 2, (n, 1))
    return ids, lp.astype(np.float32)


def by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.where(ids >= 0, ids, np.iinfo(np.int64).max), axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def max_level_error(d: np.ndarray, level_bits: int = codec.LEVEL_BITS) -> np.ndarray:
    """The largest |error| in d = max - logprob the quantiser may make at d: half a step of the row's range (which
    is the row's largest d rounded up to a RANGE_STEPS grid) either side, stretched by the compander."""
    c = codec.QUANT_SCALE
    t_row = np.log1p(np.minimum(d.max(1, keepdims=True), codec.QUANT_MAX_D) / c) + codec.T_MAX / codec.RANGE_STEPS
    half = t_row / ((1 << level_bits) - 1) / 2
    return (c + np.minimum(d, codec.QUANT_MAX_D)) * np.expm1(half) + 1e-4


def assert_topk_roundtrip(ids: np.ndarray, lp: np.ndarray, vocab: int) -> None:
    n, k = ids.shape
    blob = encode_topk(ids, lp, vocab)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    got_ids, got_lp = decode_topk(blob, n, k, vocab)
    assert got_ids.shape == (n, k) and got_ids.dtype == np.int64
    assert got_lp.shape == (n, k) and got_lp.dtype == np.float32
    assert (np.diff(got_lp, axis=1) <= 0).all(), "rows must come back sorted by log-prob, descending"
    want_ids, want_lp = by_id(ids, lp)
    got_ids_s, got_lp_s = by_id(got_ids, got_lp)
    np.testing.assert_array_equal(got_ids_s, want_ids)
    if n:
        row_max = lp.max(1)
        np.testing.assert_array_equal(got_lp[:, 0], row_max)  # the maximum is stored exactly
        d = row_max[:, None] - np.maximum(want_lp.astype(np.float64), row_max[:, None] - codec.QUANT_MAX_D)
        err = np.abs((row_max[:, None] - got_lp_s) - d)
        assert (err <= max_level_error(d)).all(), float((err - max_level_error(d)).max())
    check_topk(blob, n, k, vocab)


@pytest.mark.parametrize("vocab", [300, 65_536, QWEN_ROWS])
@pytest.mark.parametrize("n,k", [(0, 4), (1, 1), (1, 7), (37, 16), (64, 256)])
def test_topk_roundtrip_random(vocab, n, k):
    rng = np.random.default_rng(n * 1000 + k)
    if k > vocab:
        pytest.skip("K > V")
    ids, lp = random_topk(rng, n, k, vocab)
    assert_topk_roundtrip(ids, lp, vocab)


def test_topk_adversarial_values():
    vocab = QWEN_ROWS
    ids = np.array([[0, vocab - 1, 5, 6], [vocab - 1, vocab - 2, vocab - 3, 0], [17, 18, 19, 20]], np.int64)
    lp = np.array([[-0.1, -np.inf, -1e30, -45.0],  # -inf and far below the coarsest level
                   [-3.0, -3.0, -3.0, -3.0],  # all tied
                   [0.0, -1e-7, -2e-7, -80.0]], np.float32)  # p = 1 rows and a near-tie at the top
    blob = encode_topk(ids, lp, vocab)
    got_ids, got_lp = decode_topk(blob, 3, 4, vocab)
    assert np.isfinite(got_lp).all()
    assert set(got_ids[0]) == {0, vocab - 1, 5, 6} and got_ids[0, 0] == 0
    np.testing.assert_allclose(got_lp[0, 1:3], -0.1 - codec.QUANT_MAX_D, rtol=1e-5)
    np.testing.assert_array_equal(got_ids[1], [0, vocab - 3, vocab - 2, vocab - 1])  # ties: ascending ids
    np.testing.assert_array_equal(got_lp[1], -3.0)
    assert got_lp[2, 0] == 0.0 and got_ids[2, 3] == 20


def test_topk_whole_vocabulary_and_row_order_irrelevant():
    rng = np.random.default_rng(3)
    vocab = 1000
    ids = np.stack([rng.permutation(vocab) for _ in range(3)])
    lp = np.log(rng.dirichlet(np.full(vocab, 0.3), 3)).astype(np.float32)
    assert_topk_roundtrip(ids, lp, vocab)
    perm = rng.permutation(vocab)
    np.testing.assert_array_equal(encode_topk(ids[:, perm], lp[:, perm], vocab), encode_topk(ids, lp, vocab))


@pytest.mark.parametrize("level_bits", [1, 4, 8])
def test_topk_level_bits(level_bits):
    rng = np.random.default_rng(level_bits)
    ids, lp = random_topk(rng, 20, 64, QWEN_ROWS)
    blob = encode_topk(ids, lp, QWEN_ROWS, level_bits=level_bits)
    got_ids, got_lp = decode_topk(blob, 20, 64, QWEN_ROWS)
    want_ids, want_lp = by_id(ids, lp)
    got_ids, got_lp = by_id(got_ids, got_lp)
    np.testing.assert_array_equal(got_ids, want_ids)
    d = want_lp.max(1, keepdims=True) - want_lp.astype(np.float64)
    assert (np.abs((want_lp.max(1, keepdims=True) - got_lp) - d) <= max_level_error(d, level_bits)).all()
    with pytest.raises(ValueError, match="level_bits"):
        encode_topk(ids, lp, QWEN_ROWS, level_bits=9)


def test_quantiser_table():
    for level_bits in (1, 6, 8):
        table = codec.level_table(level_bits)
        assert table.shape == (codec.RANGE_STEPS + 1, 2**level_bits)
        assert (table[:, 0] == 0).all() and (np.diff(table[1:], axis=1) > 0).all() and (table[0] == 0).all()
        assert abs(float(table[-1, -1]) - codec.QUANT_MAX_D) < 1e-3
    assert isinstance(codec.ENCODING_VERSION, int)


@pytest.mark.parametrize("bad,match", [
    (dict(ids=[[1, 1]]), "repeat"),
    (dict(ids=[[1, 300]]), "vocab_size"),
    (dict(ids=[[-1, 3]]), "vocab_size"),
    (dict(lp=[[np.nan, -1.0]]), "NaN"),
    (dict(lp=[[-np.inf, -np.inf]]), "finite maximum"),
    (dict(ids=[[1, 2, 3]]), "shape|\\[n, K\\]"),
])
def test_topk_encode_refuses_bad_input(bad, match):
    ids = np.array(bad.get("ids", [[1, 2]]), np.int64)
    lp = np.array(bad.get("lp", [[-0.5, -1.0]]), np.float32)
    with pytest.raises(ValueError, match=match):
        encode_topk(ids, lp, 300)


def corrupt_variants(blob: np.ndarray) -> dict[str, np.ndarray]:
    size = codec.HEADER.size
    body = blob[size:].copy()
    flipped = blob.copy()
    flipped[len(blob) // 2] ^= 0x10
    other_version = blob.copy()
    other_version[3] = codec.ENCODING_VERSION + 1
    other_param = blob.copy()
    other_param[4] ^= 1  # top-k: the level bits (covered by the checksum like every other byte)
    extra = np.concatenate([body, np.array([0xFF], np.uint8)])  # trailing garbage with a matching checksum
    head = blob[: size - 4].tobytes()
    resealed = np.frombuffer(head + struct.pack("<I", zlib.crc32(extra.tobytes(), zlib.crc32(head))) + extra.tobytes(),
                             np.uint8)
    return {"empty": blob[:0], "header only": blob[:size], "truncated": blob[:-1], "flipped bit": flipped,
            "version": other_version, "parameter": other_param, "trailing byte": resealed,
            "wrong dtype": blob.astype(np.int16)}


def test_topk_corrupt_blobs_raise_codec_error():
    rng = np.random.default_rng(5)
    ids, lp = random_topk(rng, 9, 32, QWEN_ROWS)
    blob = encode_topk(ids, lp, QWEN_ROWS)
    for _name, bad in corrupt_variants(blob).items():
        with pytest.raises(CodecError):
            decode_topk(bad, 9, 32, QWEN_ROWS)
        with pytest.raises(CodecError):
            check_topk(bad, 9, 32, QWEN_ROWS)
    with pytest.raises(CodecError, match="vocab_size"):  # ids beyond the vocabulary the reader was told
        decode_topk(encode_topk(np.array([[5, 900]]), np.array([[-1.0, -2.0]]), 1000), 1, 2, 500)
    for n, k in ((10, 32), (8, 32), (9, 31)):  # a blob read with the wrong shape
        with pytest.raises(CodecError):
            decode_topk(blob, n, k, QWEN_ROWS)
    with pytest.raises(CodecError, match="not a top-k"):
        decode_topk(encode_sampled(np.array([[3]]), np.array([[4]]), 4, 10), 1, 1, 10)
    assert issubclass(CodecError, ValueError)


def random_sampled(rng, n: int, num_samples: int, vocab: int, alpha: float = 0.05):
    """Draw num_samples ids per row from a Dirichlet teacher; distinct ids (shuffled) + counts, padded to N."""
    ids = np.full((n, num_samples), -1, np.int64)
    counts = np.zeros((n, num_samples), np.int32)
    for row in range(n):
        support = rng.choice(vocab, min(vocab, 500), replace=False)
        draws = rng.choice(support, num_samples, p=rng.dirichlet(np.full(support.size, alpha)))
        uniq, cnt = np.unique(draws, return_counts=True)
        perm = rng.permutation(uniq.size)
        ids[row, : uniq.size], counts[row, : uniq.size] = uniq[perm], cnt[perm]
    return ids, counts


def assert_sampled_roundtrip(ids, counts, num_samples, vocab):
    n = ids.shape[0]
    blob = encode_sampled(ids, counts, num_samples, vocab)
    got_ids, got_counts = decode_sampled(blob, n, num_samples, vocab)
    assert got_ids.shape == got_counts.shape == (n, num_samples)
    assert got_ids.dtype == np.int64 and got_counts.dtype == np.int32
    want_ids, want_counts = by_id(ids, counts)
    width = want_ids.shape[1]
    if width < num_samples:
        want_ids = np.pad(want_ids, ((0, 0), (0, num_samples - width)), constant_values=-1)
        want_counts = np.pad(want_counts, ((0, 0), (0, num_samples - width)))
    np.testing.assert_array_equal(got_ids, want_ids[:, :num_samples])
    np.testing.assert_array_equal(got_counts, want_counts[:, :num_samples])
    check_sampled(blob, n, num_samples, vocab)
    return blob


@pytest.mark.parametrize("vocab", [50, 65_536, QWEN_ROWS])
@pytest.mark.parametrize("n,num_samples", [(0, 64), (1, 1), (5, 64), (40, 64), (3, 1000)])
def test_sampled_roundtrip_lossless(vocab, n, num_samples):
    rng = np.random.default_rng(n + num_samples)
    ids, counts = random_sampled(rng, n, num_samples, vocab)
    assert_sampled_roundtrip(ids, counts, num_samples, vocab)


def test_sampled_adversarial():
    vocab = QWEN_ROWS
    # one id with every draw; N distinct ids with count 1 (the widest row); ids 0 and V-1; extra padding columns
    ids = np.full((3, 70), -1, np.int64)
    counts = np.zeros((3, 70), np.int32)
    ids[0, 5], counts[0, 5] = vocab - 1, 64
    ids[1, :64], counts[1, :64] = np.arange(64) * 2371, 1
    ids[2, :3], counts[2, :3] = [0, vocab - 1, 77], [1, 62, 1]
    assert_sampled_roundtrip(ids, counts, 64, vocab)


@pytest.mark.parametrize("mutate,match", [
    (lambda i, c: c.__setitem__((0, 0), c[0, 0] + 1), "sum"),
    (lambda i, c: c.__setitem__((0, 63), 1), "padding"),
    (lambda i, c: i.__setitem__((0, 1), i[0, 0]), "repeat"),
    (lambda i, c: i.__setitem__((0, 0), 10**6), "vocab_size"),
])
def test_sampled_encode_refuses_bad_input(mutate, match):
    ids, counts = random_sampled(np.random.default_rng(0), 2, 64, 1000, alpha=5.0)
    assert (ids[0] >= 0).sum() >= 2 and ids[0, 63] == -1
    mutate(ids, counts)
    with pytest.raises(ValueError, match=match):
        encode_sampled(ids, counts, 64, 1000)
    with pytest.raises(ValueError, match="num_samples"):
        encode_sampled(ids[:0], counts[:0], 0, 1000)


def test_sampled_corrupt_blobs_raise_codec_error():
    ids, counts = random_sampled(np.random.default_rng(1), 6, 64, QWEN_ROWS)
    blob = encode_sampled(ids, counts, 64, QWEN_ROWS)
    for _name, bad in corrupt_variants(blob).items():
        with pytest.raises(CodecError):
            decode_sampled(bad, 6, 64, QWEN_ROWS)
    with pytest.raises(CodecError):
        check_sampled(blob, 6, 32, QWEN_ROWS)  # read with another N: counts cannot sum to it
    with pytest.raises(CodecError):
        decode_sampled(blob, 7, 64, QWEN_ROWS)
    with pytest.raises(CodecError, match="not a sampled"):
        decode_sampled(encode_topk(np.array([[3]]), np.array([[-1.0]]), 10), 1, 64, 10)


def test_vocab_size_limits():
    big = 1 << codec.MAX_FIELD_BITS
    ids = np.array([[0, big - 1]], np.int64)
    got, _ = decode_topk(encode_topk(ids, np.array([[-1.0, -2.0]], np.float32), big), 1, 2, big)
    np.testing.assert_array_equal(got, ids)
    with pytest.raises(ValueError, match="vocab_size"):
        encode_topk(ids, np.array([[-1.0, -2.0]], np.float32), big + 1)
