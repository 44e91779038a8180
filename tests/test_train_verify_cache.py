"""`--verify_cache`: corruption that keeps a shard's size is refused before training (one line, exit 2, the shard
named); a sound cache trains as usual."""

from __future__ import annotations

import json
import shutil

import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.format.schema import MANIFEST_NAME
from distill.train import main


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("verify") / "c", tokenizer, corpus, num_sequences=8,
                                 shard_size=4)


def _argv(student_dir, cache, out, *extra) -> list[str]:
    return ["--student", str(student_dir), "--cache", str(cache), "--output_dir", str(out), "--use_cpu", "true",
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm",
            "true", "--save_strategy", "no", *extra]


def test_verify_cache_refuses_a_silently_corrupted_shard(tmp_path, student_dir, cache_dir, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    shard = sorted(json.loads((cache / MANIFEST_NAME).read_text())["shards"], key=lambda s: s["file"])[1]["file"]
    data = bytearray((cache / shard).read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit, same size: only a checksum sees it
    (cache / shard).write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main(_argv(student_dir, cache, out, "--verify_cache", "true")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"python -m distill.train: error: --verify_cache: --cache {cache}: {shard}: sha256 mismatch")
    assert not out.exists()  # refused before anything was written


def test_verify_cache_passes_a_sound_cache(tmp_path, student_dir, cache_dir):
    assert main(_argv(student_dir, cache_dir, tmp_path / "out", "--verify_cache", "true",
                      "--eval_cache", str(cache_dir))) == 0
    assert (tmp_path / "out" / "student" / "model.safetensors").is_file()
