"""format.codec_bits (the Rice / Exp-Golomb sections under every blob) and damage the checksum cannot catch."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from test_codec import QWEN_ROWS, random_sampled, random_topk

from cache_tools.format import codec
from cache_tools.format.codec import decode_sampled, decode_topk, encode_sampled, encode_topk
from cache_tools.format.errors import CodecError


@pytest.mark.parametrize("exp_golomb", [False, True])
def test_codes_roundtrip_through_bit_sections(exp_golomb):
    from cache_tools.format.codec_bits import BlobReader, best_k, make_blob, pack_streams

    rng = np.random.default_rng(int(exp_golomb))
    values = np.concatenate([rng.integers(0, 1 << rng.integers(1, 18), 300) for _ in range(20)]).reshape(20, 300)
    values[0, :3] = [0, (1 << 18) - 1, 1]
    ks = best_k(values, None, 17 if exp_golomb else 7, exp_golomb)
    assert ks.shape == (20,) and (ks >= 0).all()
    flat_k = np.repeat(ks, 300)
    if not exp_golomb:
        values = np.minimum(values, 2000)  # Rice: keep the unary parts short
    blob = make_blob(b"T", pack_streams([(values.ravel(), flat_k, exp_golomb), (values.ravel()[::-1].copy(),
                                                                                 flat_k, exp_golomb)]), 3)
    reader = BlobReader(blob, b"T", "test")
    assert reader.param == 3
    first, second = reader.streams([(flat_k, exp_golomb), (flat_k, exp_golomb)])
    np.testing.assert_array_equal(first, values.ravel())
    np.testing.assert_array_equal(second, values.ravel()[::-1])


def test_resealed_random_damage_is_refused_or_decodes_to_valid_targets():
    """Bit flips and truncations behind a recomputed checksum (what the crc cannot catch): decoding must raise
    CodecError or return targets that still satisfy every invariant, never another exception."""
    rng = np.random.default_rng(11)
    size = codec.HEADER.size
    ids, lp = random_topk(rng, 12, 48, QWEN_ROWS)
    s_ids, s_counts = random_sampled(rng, 12, 64, QWEN_ROWS)
    blobs = {"topk": encode_topk(ids, lp, QWEN_ROWS), "sampled": encode_sampled(s_ids, s_counts, 64, QWEN_ROWS)}
    outcomes = {"refused": 0, "valid": 0}
    for _ in range(150):
        for kind, blob in blobs.items():
            bad = blob.copy()
            for pos in rng.integers(size, bad.size, rng.integers(1, 4)):
                bad[pos] ^= np.uint8(1 << int(rng.integers(0, 8)))
            if rng.random() < 0.2:
                bad = bad[: rng.integers(size, bad.size)]
            head, body = bad[: size - 4].tobytes(), bad[size:].tobytes()
            bad = np.frombuffer(head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body, np.uint8)
            try:
                if kind == "topk":
                    got, got_lp = decode_topk(bad, 12, 48, QWEN_ROWS)
                    assert ((got >= 0) & (got < QWEN_ROWS)).all() and np.isfinite(got_lp).all()
                    assert all(np.unique(row).size == 48 for row in got)
                else:
                    got, got_counts = decode_sampled(bad, 12, 64, QWEN_ROWS)
                    assert (got < QWEN_ROWS).all() and (got_counts.sum(1) == 64).all()
                    assert ((got >= 0) == (got_counts > 0)).all()
                outcomes["valid"] += 1
            except CodecError:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 50, outcomes


def test_wide_fields_are_plain_msb_first_bits():
    """Fields wider than MAX_FIELD_BITS (int32 token offsets need 33 bits) are written and read in two parts; on disk
    they are the same MSB-first bits as any field, and a reader only accepts them up to the width it asks for."""
    from cache_tools.format.codec_bits import MAX_FIELD_BITS, BlobReader, make_blob, pack_streams, split_codes

    values = np.array([0, 1, 2**25, 2**33 - 1, 5, 2**30 + 7, 2**26 - 1], np.int64)
    ks = np.full(values.size, 3)
    parts = pack_streams([(values, ks, True)])
    _, fields, widths = split_codes(values, ks, True)
    assert int(widths.max()) > MAX_FIELD_BITS
    bits = "".join(format(int(f), f"0{int(w)}b") for f, w in zip(fields, widths, strict=True))
    bits += "0" * (-len(bits) % 8)
    assert parts[2].tobytes() == int(bits, 2).to_bytes(len(bits) // 8, "big")
    blob = make_blob(b"X", parts)
    np.testing.assert_array_equal(BlobReader(blob, b"X", "test").streams([(ks, True)], 34)[0], values)
    with pytest.raises(CodecError, match="33-bit field"):
        BlobReader(blob, b"X", "test").streams([(ks, True)])  # default: the narrow fields of ids and counts
    with pytest.raises(ValueError, match="51-bit field"):
        pack_streams([(np.array([2**51], np.int64), np.array([0]), True)])
