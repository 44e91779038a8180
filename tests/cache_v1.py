"""A version 1 cache exactly as the pre-v2 builder wrote it (frozen here on purpose: the format it reproduces no
longer changes): UTF-8 string text, top-k fp16 arrays, a manifest with a top-level ``top_k`` and no ``targets``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

V1_DATASETS = ("input_ids", "valid_length", "doc_index", "text", "offsets", "topk_ids", "topk_logprobs",
               "tail_logprob", "pooled_hidden")


def write_v1_cache(cache_dir: Path, rng: np.random.Generator, *, num_sequences: int = 5, L: int = 6, K: int = 4,
                   V: int = 300, P: int = 2, H: int = 3) -> dict[str, np.ndarray]:
    """One shard of `num_sequences` windows; returns the arrays written (text as a list of str)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lengths = rng.integers(1, L + 1, size=num_sequences).astype(np.int32)
    probs = rng.dirichlet(np.ones(K + 1), size=(num_sequences, L))  # K slots + tail, sums to 1
    order = np.argsort(-probs[..., :K], axis=-1)
    arrays = {
        "input_ids": rng.integers(0, V, size=(num_sequences, L)).astype(np.uint16),
        "valid_length": lengths,
        "doc_index": np.arange(num_sequences, dtype=np.int64),
        "text": [f"window {i} é" for i in range(num_sequences)],
        # (start <= end) within the text, as a tokenizer gives them (`verify` checks that)
        "offsets": np.sort(rng.integers(0, 9, size=(num_sequences, L, 2)), axis=-1).astype(np.int32),
        "topk_ids": np.stack([rng.permutation(V)[:K] for _ in range(num_sequences * L)]).reshape(
            num_sequences, L, K).astype(np.uint16),
        "topk_logprobs": np.log(np.take_along_axis(probs[..., :K], order, -1)).astype(np.float16),
        "tail_logprob": np.log(probs[..., K]).astype(np.float32),
        "pooled_hidden": rng.standard_normal((num_sequences, P, H)).astype(np.float16),
    }
    path = cache_dir / "shard-00000.h5"
    with h5py.File(path, "w") as f:
        for name in V1_DATASETS:
            dtype = h5py.string_dtype("utf-8") if name == "text" else arrays[name].dtype
            f.create_dataset(name, data=np.asarray(arrays[name], dtype=object if name == "text" else None),
                             dtype=dtype)
        f.attrs.update({"format_version": 1, "shard_index": 0, "first_sequence": 0, "num_sequences": num_sequences,
                        "num_tokens": int(lengths.sum()), "top_k": K, "max_length": L, "vocab_size": V})
    shard = {"file": path.name, "index": 0, "first_sequence": 0, "num_sequences": num_sequences,
             "num_tokens": int(lengths.sum()), "bytes": path.stat().st_size,
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {
        "format_version": 1, "builder_version": "0.1", "complete": True,
        "teacher": {"name_or_path": "t", "config_hash": "c", "model_type": "m", "hidden_size": H,
                    "num_hidden_layers": 2, "head_rows": V},
        "tokenizer": {"name_or_path": "tok", "content_hash": "x", "vocab_size": V,
                      "special_ids": {"eos": 0}, "special_tokens": {"eos": "<eos>"}},
        "top_k": K, "max_length": L, "id_dtype": "uint16",
        "pooling": {"method": "masked_mean", "layers": list(range(P)), "hidden_size": H},
        "dataset": {"spec": "d", "split": "train", "text_column": "text", "max_samples": None, "streaming": False,
                    "fingerprint": "f"},
        "compute_dtype": "fp32", "batch_size": 2, "shard_size": 8, "compression": "none",
        "num_sequences": num_sequences, "num_tokens": int(lengths.sum()), "shards": [shard], "created_at": "",
    }
    (cache_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return arrays
