"""Packing on the student side: which documents share a window, and what the student may attend to.

A cache built with isolated packing records, per window, the lengths of the document pieces packed in it
(`CachedSequence.segment_lengths`, summing to the window's n); its teacher never attended across them, so the student
must not either. Examples then carry `segment_lengths`; the collator turns them into per-document `position_ids`
and `segment_ids` (-1 on padding) and the model builds a block-diagonal causal mask from those
(`distill.training.attention`). Cross-document packing (every cache before format 3) carries none of this: one
causal mask over the whole window, as before.

The last position of a piece predicts the first token of the next, unrelated piece: with isolation it gets no CE
label (the teacher, run on that piece alone, gave its target for whatever follows it; KD keeps that target, as at
the end of a window).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cache_tools.format.errors import ConfigError

PACKING_MODES = ("isolated", "cross_document")
ISOLATED, CROSS_DOCUMENT = PACKING_MODES


def cache_packing(manifest: Any) -> str:
    """The packing mode a cache was built with ("isolated" | "cross_document"). Manifests before format 3 have no
    record: their windows were packed across documents."""
    for holder in (manifest, getattr(manifest, "dataset", None)):
        for name in ("packing", "packing_mode"):
            value = getattr(holder, name, None)
            if isinstance(value, str) and value:
                return value
            mode = getattr(value, "mode", None)
            if isinstance(mode, str) and mode:
                return mode
    return CROSS_DOCUMENT


def resolve_packing(requested: str | None, caches: list[tuple[str, Any]]) -> str:
    """The packing the student trains with: the caches' recorded mode. `requested` (--packing) may repeat it; a
    different value is a ConfigError (a student attending across documents its teacher never saw together, or the
    reverse, would train on targets that do not fit its inputs). `caches`: (path, manifest) pairs."""
    modes = {path: cache_packing(manifest) for path, manifest in caches}
    if len(set(modes.values())) > 1:
        listed = ", ".join(f"{path} ({mode})" for path, mode in modes.items())
        raise ConfigError(f"--cache/--eval_cache: the caches were packed differently ({listed}); evaluate on a cache "
                          "built with the same --packing")
    mode = next(iter(modes.values()), requested or CROSS_DOCUMENT)
    if requested and requested != mode:
        path = next(iter(modes))
        raise ConfigError(f"--packing {requested}: the cache {path} was built with {mode} packing and the student "
                          f"follows it; drop --packing or rebuild the cache with --packing {requested}")
    return mode


def segment_lengths_of(seq: Any) -> np.ndarray:
    """int32 [d] lengths of the document pieces of a cached window (one piece [n] for caches that record none)."""
    lengths = getattr(seq, "segment_lengths", None)
    n = int(seq.input_ids.shape[0])
    if lengths is None:
        return np.array([n], dtype=np.int32)
    return np.asarray(lengths, dtype=np.int32)


def eos_segments(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 [d]: a plain-text window packed with EOS between documents, cut after each EOS (the separator closes
    the document before it, as `pack_windows` assigns it)."""
    ends = np.flatnonzero(np.asarray(input_ids) == eos_id) + 1
    n = int(input_ids.shape[0])
    cuts = np.concatenate([[0], ends[ends < n], [n]])
    return np.diff(cuts).astype(np.int32)


def positions_and_segments(lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids int64 [n]: 0.. within each piece, segment_ids int64 [n]: piece index). Checks the pieces
    tile the n tokens (a damaged record would otherwise shift every mask)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or (lengths <= 0).any() or int(lengths.sum()) != n:
        raise ValueError(f"segment lengths {lengths.tolist()[:8]} do not tile a window of {n} tokens")
    segment_ids = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    positions = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    return positions, segment_ids


def segment_last_positions(lengths: np.ndarray) -> np.ndarray:
    """int64 [d]: index of the last token of each piece."""
    return np.cumsum(np.asarray(lengths, dtype=np.int64)) - 1
