"""The compact window encoding (`codec_window`): input ids and text round-trip exactly at every id width, and a
blob that is damaged, truncated, another row's, of another count or another vocabulary width is refused."""

from __future__ import annotations

import numpy as np
import pytest

from cache_tools.format import codec_window
from cache_tools.format.errors import CodecError

TEXT = "Tout\x00 va bien — ça marche 🙂 \udc80 end"  # NUL, accents, an emoji and a lone surrogate


@pytest.mark.parametrize("vocab, B", [(3, 1), (256, 1), (257, 2), (65_536, 2), (65_537, 3), (151_936, 3),
                                      (2**24 + 1, 4), (2**32, 4)])
def test_round_trip_is_exact(vocab, B):
    rng = np.random.default_rng(vocab % 1000)
    ids = np.concatenate([[0, vocab - 1], rng.integers(0, vocab, size=61)])
    assert codec_window.id_bytes(vocab) == B
    blob = codec_window.encode_window(ids, TEXT, vocab, sequence=12)
    got, text = codec_window.decode_window(blob, ids.size, vocab, sequence=12)
    np.testing.assert_array_equal(got, ids)
    assert got.dtype == np.int64 and text == TEXT
    as_bytes = np.frombuffer(TEXT.encode("utf-8", errors="surrogatepass"), np.uint8)  # the text dataset's form
    assert np.array_equal(codec_window.encode_window(ids, as_bytes, vocab, sequence=12), blob)


def test_empty_window():
    blob = codec_window.encode_window(np.zeros(0, np.int64), "", 10, sequence=0)
    ids, text = codec_window.decode_window(blob, 0, 10, sequence=0)
    assert ids.shape == (0,) and text == ""


def test_every_bit_flip_and_truncation_is_refused():
    blob = codec_window.encode_window(np.arange(20) * 7, "a short window", 151_936, sequence=3)
    for bit in range(blob.size * 8):
        bad = blob.copy()
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError):
            codec_window.decode_window(bad, 20, 151_936, sequence=3)
    for size in range(blob.size):
        with pytest.raises(CodecError):
            codec_window.decode_window(blob[:size], 20, 151_936, sequence=3)


def test_another_row_count_or_vocabulary_is_refused():
    blob = codec_window.encode_window(np.arange(20), "x", 151_936, sequence=3)
    for sequence in (2, 4, 3 + 2**32):
        with pytest.raises(CodecError, match="another row's blob"):
            codec_window.decode_window(blob, 20, 151_936, sequence=sequence)
    with pytest.raises(CodecError, match="holds 20 ids"):
        codec_window.decode_window(blob, 21, 151_936, sequence=3)
    with pytest.raises(CodecError, match="claims 64 payload bytes"):
        codec_window.decode_window(blob, 19, 151_936, sequence=3)
    with pytest.raises(CodecError, match="3-byte ids"):
        codec_window.decode_window(blob, 20, 2**24 + 1, sequence=3)
    with pytest.raises(CodecError, match="input id 19 >= vocab_size 10"):
        codec_window.decode_window(codec_window.encode_window(np.arange(20), "", 100, sequence=0), 20, 10, sequence=0)
    with pytest.raises(CodecError, match="not a window blob"):
        from cache_tools.format import codec_zstd

        codec_window.decode_window(codec_zstd.encode_offsets(np.zeros((20, 2), np.int32), sequence=3), 20, 151_936,
                                   sequence=3)


def test_encoder_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="input ids"):
        codec_window.encode_window(np.array([0, 10]), "", 10, sequence=0)
    with pytest.raises(ValueError, match="input ids"):
        codec_window.encode_window(np.array([-1]), "", 10, sequence=0)
