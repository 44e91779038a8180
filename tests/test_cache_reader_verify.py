"""Reading a built cache (random access, slices, DataLoader workers) and `cache_tools inspect` / `verify`."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from cache_tools.builder import BuildOptions, build_cache
from cache_tools.cli import main
from cache_tools.format import schema
from cache_tools.format.reader import TeacherCacheReader

SHARD_SIZE = 5


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_dir, text_file):
    out = tmp_path_factory.mktemp("rv") / "cache"
    build_cache(BuildOptions(teacher=str(teacher_dir), dataset=str(text_file), output=str(out), max_length=40,
                             top_k=12, shard_size=SHARD_SIZE, batch_size=4, max_samples=12, progress=False))
    return out


def test_random_access_and_slices_across_shards(cache):
    reader = TeacherCacheReader(cache)
    n = len(reader)
    assert n > 2 * SHARD_SIZE
    block = reader.read_slice(SHARD_SIZE - 2, SHARD_SIZE + 3)  # crosses a shard boundary
    assert block[schema.TOPK_IDS].shape[0] == 5
    for offset, index in enumerate(range(SHARD_SIZE - 2, SHARD_SIZE + 3)):
        seq = reader[index]
        length = int(block[schema.VALID_LENGTH][offset])
        assert seq.length == length
        np.testing.assert_array_equal(seq.topk_ids, block[schema.TOPK_IDS][offset, :length])
        np.testing.assert_array_equal(seq.topk_logprobs, block[schema.TOPK_LOGPROBS][offset, :length])
        assert seq.text == block[schema.TEXT][offset]
    for index in np.random.default_rng(0).permutation(n)[:6]:
        assert reader[int(index)].index == index
    with pytest.raises(IndexError):
        reader[n]


class _CacheDataset(torch.utils.data.Dataset):
    def __init__(self, reader: TeacherCacheReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        seq = self.reader[index]
        return {"index": index, "ids_sum": int(seq.topk_ids.sum()), "lp_sum": float(seq.topk_logprobs.sum())}


def test_reader_under_dataloader_workers(cache):
    reader = TeacherCacheReader(cache)
    reader[0]  # open a handle in the parent first: workers must not reuse it
    loader = torch.utils.data.DataLoader(_CacheDataset(reader), batch_size=3, num_workers=2, shuffle=False)
    seen = {}
    for batch in loader:
        for i, ids_sum, lp_sum in zip(batch["index"], batch["ids_sum"], batch["lp_sum"], strict=True):
            seen[int(i)] = (int(ids_sum), float(lp_sum))
    assert sorted(seen) == list(range(len(reader)))
    for index, (ids_sum, lp_sum) in seen.items():
        seq = reader[index]
        assert ids_sum == int(seq.topk_ids.sum())
        assert lp_sum == pytest.approx(float(seq.topk_logprobs.sum()), rel=1e-6)


def test_inspect_json_and_text(cache, capsys):
    assert main(["inspect", str(cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = schema.load_manifest(cache)
    for key in ("format_version", "teacher", "vocab_size", "top_k", "num_sequences", "num_tokens", "bytes_per_token",
                "complete"):
        assert key in info
    assert info["num_sequences"] == manifest.num_sequences and info["complete"] is True
    assert info["bytes_per_token"] == pytest.approx(sum(s.bytes for s in manifest.shards) / manifest.num_tokens)
    assert main(["inspect", str(cache)]) == 0
    assert "num_tokens" in capsys.readouterr().out


def test_coverage_command_reports(cache, capsys, tokenizer_dir):
    from distill.coverage import main as coverage_main

    assert coverage_main([str(cache), "--student-tokenizer", str(tokenizer_dir)]) == 0
    assert capsys.readouterr().out.strip()


def test_verify_sound_cache(cache, capsys):
    assert main(["verify", str(cache)]) == 0
    assert "OK" in capsys.readouterr().out


def _copy(cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    return copy, schema.load_manifest(copy)


def _verify_fails(capsys, path, *needles: str) -> None:
    assert main(["verify", str(path)]) != 0
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_verify_bit_flip(cache, tmp_path, capsys):
    copy, manifest = _copy(cache, tmp_path)
    shard = copy / manifest.shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    _verify_fails(capsys, copy, manifest.shards[1].file, "sha256 mismatch")


def test_verify_truncated(cache, tmp_path, capsys):
    copy, manifest = _copy(cache, tmp_path)
    shard = copy / manifest.shards[0].file
    shard.write_bytes(shard.read_bytes()[:1000])
    _verify_fails(capsys, copy, manifest.shards[0].file, "truncated")


def _rewrite_with_fresh_checksum(copy, manifest, shard_pos, edit) -> str:
    """Apply `edit` to a shard, then fix its size/sha in the manifest so only the content checks can catch it."""
    info = manifest.shards[shard_pos]
    path = copy / info.file
    with h5py.File(path, "r+") as f:
        edit(f)
    info.bytes, info.sha256 = path.stat().st_size, schema.file_sha256(path)
    manifest.save(copy)
    return info.file


@pytest.mark.parametrize(
    ("fault", "edit"),
    [
        ("log-probs > 0", lambda f: f[schema.TOPK_LOGPROBS].__setitem__((0, 0, 0), 0.5)),
        ("not sorted", lambda f: f[schema.TOPK_LOGPROBS].__setitem__((0, 3, slice(None)), np.linspace(-9, -1, 12))),
        ("vocab_size", lambda f: f[schema.TOPK_IDS].__setitem__((1, 2, 0), 60000)),
        ("probabilities sum", lambda f: f[schema.TAIL_LOGPROB].__setitem__((0, 1), 0.0)),
        ("non-finite", lambda f: f[schema.TAIL_LOGPROB].__setitem__((0, 4), np.nan)),
    ],
)
def test_verify_content_faults(cache, tmp_path, capsys, fault, edit):
    copy, manifest = _copy(cache, tmp_path)
    name = _rewrite_with_fresh_checksum(copy, manifest, 1, edit)
    _verify_fails(capsys, copy, name, fault)


def test_verify_incomplete_and_missing(tmp_path, capsys):
    _verify_fails(capsys, tmp_path / "nothing", "no such cache directory")
    schema.CacheManifest(tokenizer=schema.TokenizerInfo(vocab_size=10, content_hash="x")).save(tmp_path)
    _verify_fails(capsys, tmp_path, "incomplete")
