"""Stand-ins for interfaces other modules deliver, used by the format tests only until the real ones are on main:
`cache_tools.codec` (compact encodings) and `cache_tools.teacher.sample_targets` / `sequence_uniforms` (sampling).
`use_codec` / `use_sampler` prefer the real implementation and fall back to these (same contract, no packing)."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import torch


def _pack(*arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in arrays])


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    return _pack(ids.astype(np.int64), logprobs.astype(np.float32))


def decode_topk(blob: np.ndarray, n: int, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    blob = np.asarray(blob, dtype=np.uint8)
    if blob.size != n * k * 12:
        raise ValueError(f"top-k blob of {blob.size} bytes, expected {n * k * 12}")
    ids = blob[: n * k * 8].view(np.int64).reshape(n, k)
    return ids.copy(), blob[n * k * 8 :].view(np.float32).reshape(n, k).copy()


def encode_sampled(ids: np.ndarray, counts: np.ndarray, num_samples: int, vocab_size: int) -> np.ndarray:
    n = ids.shape[0]
    full_ids = np.full((n, num_samples), -1, np.int64)
    full_counts = np.zeros((n, num_samples), np.int32)
    full_ids[:, : ids.shape[1]], full_counts[:, : ids.shape[1]] = ids, counts
    return _pack(full_ids, full_counts)


def decode_sampled(blob: np.ndarray, n: int, num_samples: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    blob = np.asarray(blob, dtype=np.uint8)
    if blob.size != n * num_samples * 12:
        raise ValueError(f"sampled blob of {blob.size} bytes, expected {n * num_samples * 12}")
    ids = blob[: n * num_samples * 8].view(np.int64).reshape(n, num_samples)
    return ids.copy(), blob[n * num_samples * 8 :].view(np.int32).reshape(n, num_samples).copy()


def sample_targets(logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws: distinct ids ascending, -1 padded, with their counts."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    draws = torch.searchsorted(cdf, uniforms.to(cdf.device)).clamp_max(logits.shape[-1] - 1)
    rows, N = draws.shape
    ids = torch.full((rows, N), -1, dtype=torch.int64)
    counts = torch.zeros((rows, N), dtype=torch.int32)
    for r in range(rows):
        distinct, times = torch.unique(draws[r].cpu(), return_counts=True)
        ids[r, : distinct.numel()], counts[r, : distinct.numel()] = distinct, times.int()
    return ids.to(logits.device), counts.to(logits.device)


def sequence_uniforms(seed: int, global_index: int, length: int, num_samples: int) -> np.ndarray:
    return np.random.default_rng([seed, global_index]).random((length, num_samples))


def use_codec(monkeypatch) -> types.ModuleType:
    """The real `cache_tools.codec` if present, else a module of the placeholders above installed in its place."""
    try:
        return importlib.import_module("cache_tools.codec")
    except ModuleNotFoundError:
        module = types.ModuleType("cache_tools.codec")
        for name in ("encode_topk", "decode_topk", "encode_sampled", "decode_sampled"):
            setattr(module, name, globals()[name])
        monkeypatch.setitem(sys.modules, "cache_tools.codec", module)
        monkeypatch.setattr(importlib.import_module("cache_tools"), "codec", module, raising=False)
        return module


def use_sampler(monkeypatch) -> None:
    """The real sampling functions of `cache_tools.teacher` if present, else the placeholders above."""
    from cache_tools import teacher

    for name in ("sample_targets", "sequence_uniforms"):
        if not hasattr(teacher, name):
            monkeypatch.setattr(teacher, name, globals()[name], raising=False)
