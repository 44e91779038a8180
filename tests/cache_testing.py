"""Helpers for tests and benchmarks of the cache: whole-cache snapshots for equality checks, a teacher whose padded
head rows would win every top-k if they were not sliced off, and the environment for CPU subprocess builds."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema, shard_io


def cache_arrays(cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every stored dataset of every shard, concatenated in global sequence order (text as an object array of str;
    blobs as object arrays of uint8 arrays)."""
    manifest = schema.load_manifest(cache_dir)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in schema.dataset_names(manifest)}
    for shard in sorted(manifest.shards, key=lambda s: s.first_sequence):
        with shard_io.open_shard(Path(cache_dir) / shard.file) as f:
            for name, values in shard_io.read_rows(f, manifest, 0, shard.num_sequences).items():
                parts[name].append(values)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def shard_hashes(cache_dir: str | os.PathLike) -> list[tuple[str, str]]:
    manifest = schema.load_manifest(cache_dir)
    return [(s.file, s.sha256) for s in sorted(manifest.shards, key=lambda s: s.index)]


def assert_same_cache(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Byte-equal arrays and identical shard files (the builder is deterministic on one device type)."""
    left, right = cache_arrays(a), cache_arrays(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        same = (all(np.array_equal(x, y) for x, y in zip(left[name], right[name], strict=True))
                if left[name].dtype == object else np.array_equal(left[name], right[name]))
        assert same and len(left[name]) == len(right[name]), f"{name} differs between {a} and {b}"
    assert shard_hashes(a) == shard_hashes(b)


def save_boosted_teacher(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int,
                         boost: float = 4.0) -> Path:
    """Copy of the teacher whose padded head rows (>= vocab_size, as in Qwen) are `boost` x copies of real rows, so
    wherever those real rows score high the padded rows score far higher: a builder that forgot to slice them off
    would list them in the top-k and mis-normalise every log-prob."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[vocab_size:] = boost * head[: head.shape[0] - vocab_size]
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return Path(out_dir)


def subprocess_env() -> dict[str, str]:
    """CPU, offline, one thread per process, and the repo on PYTHONPATH."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=repo + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def cli_command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "cache_tools", *map(str, args)]
