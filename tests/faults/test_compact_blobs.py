"""Damage to format 3 compact blobs with the shard checksums kept valid (a faulty writer, or a deliberate edit), so
only the blobs' own checks can tell: a flipped bit inside a blob, a truncated blob, a wrong codec id, blobs swapped
between rows, a format 2 blob in a format 3 cache; the same for the window blobs (input ids + text). Each: `verify`
exits 2 naming the shard, the sequence and a fix, the reader raises one CacheError line naming shard and sequence
(never wrong numbers), `--resume` rebuilds the shard byte for byte."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cache_testing import assert_same_cache

from cache_tools.format import codec, schema
from faults.harness import edit_shard_consistently, run_cli

pytestmark = pytest.mark.faults

S1 = schema.shard_name(1)
ROW = 1  # damaged row of shard 1


def _flip_bit(values: np.ndarray) -> None:
    blob = values[ROW].copy()
    blob[blob.size // 2] ^= np.uint8(0x10)
    values[ROW] = blob


def _truncate(values: np.ndarray) -> None:
    values[ROW] = values[ROW][:-3].copy()


def _wrong_codec_id(values: np.ndarray) -> None:
    blob = values[ROW].copy()
    blob[2] = ord("S")  # a top-k blob relabelled as a sampled one
    values[ROW] = blob


def _swap(values: np.ndarray) -> None:
    values[ROW], values[ROW + 1] = values[ROW + 1].copy(), values[ROW].copy()


def _format_2_blob(values: np.ndarray) -> None:
    values[ROW] = codec.encode_topk(np.array([[1, 2]]), np.array([[-1.0, -2.0]], np.float32), 10)


CASES: dict[str, tuple[str, Callable[[np.ndarray], None], str]] = {
    "topk_blob_bit_flip": (schema.TOPK_BLOB, _flip_bit, "fails its checksum"),
    "topk_blob_truncated": (schema.TOPK_BLOB, _truncate, "fails its checksum"),
    "topk_blob_wrong_codec_id": (schema.TOPK_BLOB, _wrong_codec_id, "not a top-k blob"),
    "topk_blobs_swapped": (schema.TOPK_BLOB, _swap, "another row's blob"),
    "topk_blob_of_format_2": (schema.TOPK_BLOB, _format_2_blob, "codec version 1"),
    "offsets_blob_bit_flip": (schema.OFFSETS_BLOB, _flip_bit, "fails its checksum"),
    "offsets_blobs_swapped": (schema.OFFSETS_BLOB, _swap, "another row's blob"),
    "window_blob_bit_flip": (schema.WINDOW_BLOB, _flip_bit, "fails its checksum"),
    "window_blob_truncated": (schema.WINDOW_BLOB, _truncate, "fails its checksum"),
    "window_blobs_swapped": (schema.WINDOW_BLOB, _swap, "another row's blob"),
}


@pytest.fixture
def compact_copy(tmp_path, compact_cache) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(compact_cache, out)
    return out


def _damage(cache: Path, name: str) -> tuple[int, str]:
    dataset, edit, says = CASES[name]
    edit_shard_consistently(cache, 1, dataset, edit)
    first = next(s.first_sequence for s in schema.load_manifest(cache).shards if s.file == S1)
    return first + ROW, says


@pytest.mark.parametrize("name", list(CASES))
def test_verify_and_reader_refuse(name, compact_copy, capsys):
    from cache_tools.format.reader import TeacherCacheReader

    sequence, says = _damage(compact_copy, name)
    outcome = run_cli(["verify", str(compact_copy)], capsys)
    first = outcome.stderr[0] if outcome.stderr else ""
    assert outcome.code == 2 and "Traceback" not in "\n".join(outcome.stderr), outcome.stderr
    assert S1 in first and f"(sequence {sequence})" in first and says in first and "--resume" in first, first
    reader = TeacherCacheReader(compact_copy)
    with pytest.raises(schema.CacheError) as info:
        reader[sequence]
    message = str(info.value)
    assert "\n" not in message and S1 in message and f"sequence {sequence} (row {ROW})" in message, message
    assert says in message, message


@pytest.mark.parametrize("name", ["topk_blobs_swapped", pytest.param("topk_blob_bit_flip",
                                                                    marks=pytest.mark.faults_full)])
def test_resume_rebuilds_the_shard(name, compact_copy, compact_cache, build_args, capsys):
    _damage(compact_copy, name)
    outcome = run_cli(build_args(compact_copy, "--encoding", "compact", "--resume"), capsys)
    assert outcome.code == 0, "\n".join(outcome.stderr)
    assert any(S1 in line and "discarding" in line for line in outcome.stderr), outcome.stderr
    assert_same_cache(compact_cache, compact_copy)
