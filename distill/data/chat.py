"""Which positions of a conversational window train the student (`--assistant_only_loss`, TRL's name).

A conversational cache marks, per token, the assistant / completion content (`CachedSequence.assistant_mask`, the
end-of-turn token included) and which positions hold stored teacher targets (`target_mask`: all True unless the
cache stores targets on assistant positions only). Position t predicts token t + 1, so:

- assistant-only (the default on conversational caches): CE at t when token t + 1 is assistant content, KD at t when
  in addition t has stored targets. The last position of a window predicts a token of the next window: no loss.
- everything (`--assistant_only_loss false`): CE at every position, KD wherever targets are stored.

Plain-text caches have no assistant mask; asking for assistant-only loss on one is a ConfigError (it would silently
train on every token).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cache_tools.format.errors import ConfigError
from cache_tools.format.manifest import ROW_FORMATS


def cache_row_format(manifest: Any) -> str:
    """One of `ROW_FORMATS` ("text", "messages", "prompt_completion", ...) as the manifest records it ("text"
    before format 3)."""
    for holder in (getattr(manifest, "dataset", None), manifest):
        for name in ("row_format", "format"):
            value = getattr(holder, name, None)
            if isinstance(value, str) and value in ROW_FORMATS:
                return value
    return "text"


def is_conversational(manifest: Any) -> bool:
    return cache_row_format(manifest) != "text"


def resolve_assistant_only(requested: bool | None, caches: list[tuple[str, Any]]) -> bool:
    """--assistant_only_loss for these caches: default True when they are conversational, False otherwise; True on
    a plain-text cache is a ConfigError naming it. `caches`: (path, manifest) pairs."""
    plain = [path for path, manifest in caches if not is_conversational(manifest)]
    if requested is None:
        return bool(caches) and not plain
    if requested and plain:
        raise ConfigError(f"--assistant_only_loss true: {plain[0]} is a plain-text cache (no assistant mask); drop "
                          "the flag or build the cache from a conversational dataset (messages or prompt/completion)")
    return bool(requested)


def loss_masks(seq: Any, assistant_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(label_mask bool [n] or None = every label counts, kd_mask bool [n]) of a cached window (`CachedSequence`, or
    `CachedTargets`: its masks alone decide)."""
    n = seq.length
    target = getattr(seq, "target_mask", None)
    target = np.ones(n, dtype=np.bool_) if target is None else np.asarray(target, dtype=np.bool_)
    assistant = getattr(seq, "assistant_mask", None)
    if not assistant_only or assistant is None:
        return None, target.copy()
    next_is_assistant = np.zeros(n, dtype=np.bool_)
    next_is_assistant[:-1] = np.asarray(assistant, dtype=np.bool_)[1:]
    return next_is_assistant, next_is_assistant & target


def unstored_targets(seq: Any) -> tuple[int, int]:
    """(assistant positions trained, those without stored teacher targets) of a window, for reports."""
    label_mask, kd_mask = loss_masks(seq, True)
    if label_mask is None:
        return 0, 0
    return int(label_mask.sum()), int((label_mask & ~kd_mask).sum())
