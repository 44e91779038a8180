"""Checks run before any weights are loaded: `--verify_cache` (checksums and values of every shard).

Training itself only validates the sequences it loads (cheap vectorised checks); corruption that keeps a shard's
size and passes those checks (a flipped bit in a log-prob) would train silently. `--verify_cache` reads every shard
once up front, as `cache_tools verify` does, and refuses to start on the first fault.
"""

from __future__ import annotations

from typing import Any


def verify_caches(data: Any) -> None:
    """With `--verify_cache`: verify `data.cache` and `data.eval_cache`; raise CacheError (a one-line UserError,
    exit 2) naming the flag, the cache and its first fault. Every rank checks (no process group is needed)."""
    if not data.verify_cache:
        return
    from cache_tools.schema import CacheError
    from cache_tools.verify import verify_cache

    for flag, cache in (("--cache", data.cache), ("--eval_cache", data.eval_cache)):
        if not cache:
            continue
        faults = verify_cache(cache)
        if faults:
            more = f" (and {len(faults) - 1} more fault(s))" if len(faults) > 1 else ""
            raise CacheError(f"--verify_cache: {flag} {cache}: {faults[0]}{more}")
