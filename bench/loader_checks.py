"""What the integrity checks on the read path cost a loader worker (part of `python -m bench --only loader`):

- fp16 cache, each shard's size + sha256 checked before a process first reads it (`TeacherCacheReader(
  verify_shards=True)`, what training uses). A pass over every window with a fresh reader (a new DataLoader worker)
  and the direct target builder, checks on record (every epoch and run after the first) and with an empty record
  folder (the first run after a build hashes each shard once), against the same pass without checks.
- cross-tokenizer store: a CRC-32 per window checked on every read, against the same reads with the check off.

Measured in one process (what each DataLoader worker does), each pair alternately (off, on, off, on, ...) and the
medians compared, so load drift on a shared machine hits both sides alike; worker start-up noise stays out."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ratio


def _alternate(off: Callable[[], float], on: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Median seconds of `off` and `on`, measured alternately."""
    offs, ons = [], []
    for _ in range(rounds):
        offs.append(off())
        ons.append(on())
    return statistics.median(offs), statistics.median(ons)


def run_checks(cache: Path, direct: Any, stored: Any, rounds: int) -> dict[str, Any]:
    """`direct`: the direct target builder; `stored`: a `CrossTokenizerTargets` reading a prepared store."""
    from cache_tools.format import shard_check
    from cache_tools.format.reader import TeacherCacheReader

    def cache_pass(verify: bool, forget: Path | None = None) -> float:
        if forget is not None:  # the first run after a build: no shard on record
            for record in forget.iterdir():
                record.unlink()
        start = time.perf_counter()
        reader = TeacherCacheReader(cache, verify_shards=verify)
        for i in range(len(reader)):
            direct(reader[i])
        reader.close()
        return time.perf_counter() - start

    saved = os.environ.get(shard_check.RECORD_ENV)
    with tempfile.TemporaryDirectory(prefix="bench-verified-") as records:
        os.environ[shard_check.RECORD_ENV] = records
        try:
            off, first = _alternate(lambda: cache_pass(False), lambda: cache_pass(True, Path(records)), rounds)
            cache_pass(True)  # every shard on record
            off2, on_record = _alternate(lambda: cache_pass(False), lambda: cache_pass(True), rounds)
        finally:
            if saved is None:
                os.environ.pop(shard_check.RECORD_ENV, None)
            else:
                os.environ[shard_check.RECORD_ENV] = saved

    reader = TeacherCacheReader(cache)

    def store_pass(checksums: bool) -> float:
        stored.store.checksums = checksums
        start = time.perf_counter()
        for i in range(len(reader)):
            stored.fetch(reader, i)
        return time.perf_counter() - start

    xtok_off, xtok_on = _alternate(lambda: store_pass(False), lambda: store_pass(True), rounds)
    stored.store.checksums = True
    windows = len(reader)
    return {
        "ratios": {
            # throughput ratios: checked windows/s over unchecked windows/s (1.0 = free)
            "fp16 read path, shards on record/unchecked": ratio(off2, on_record, ">= 0.95",
                                                                "same pass, verify_shards off"),
            "fp16 read path, first run (hashing)/unchecked": ratio(off, first, "", "same pass, verify_shards off"),
            "xtok store read path, window CRC/unchecked": ratio(xtok_off, xtok_on, "", "same reads, CRC off"),
        },
        "windows_per_s": {"fp16_unchecked": windows / off2, "fp16_on_record": windows / on_record,
                          "fp16_unchecked_first_pair": windows / off, "fp16_first_run": windows / first,
                          "xtok_store_unchecked": windows / xtok_off, "xtok_store_crc": windows / xtok_on},
        "rounds": rounds,
    }
