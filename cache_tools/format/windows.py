"""What a cache's windows ARE, independent of its targets: a per-shard content digest, and the check that several
caches (several teachers) cover the same windows.

The digest of a shard is sha256 over, for each window in row order: its valid length n, its n input ids and its text
(UTF-8, length-prefixed), all little-endian int64 framed. The builder records it in each shard's sidecar and manifest
entry (`ShardInfo.windows_digest`, format version 3); for caches without it (versions 1 and 2) `shard_digests`
computes the same value by reading `input_ids`, `valid_length` and `text` (or the window blobs; never the targets).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

from cache_tools.format import codec_window, encodings, schema
from cache_tools.format.errors import CacheError, CacheMismatchError

_TAG = b"distill-cache windows digest v1\n"
_ROWS_PER_READ = 256


class WindowDigest:
    """Incremental digest of a run of windows (see the module docstring for what it covers)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(_TAG)

    def update(self, input_ids: np.ndarray, valid_length: Iterable[int], texts: Iterable[str]) -> None:
        """input_ids [n, >= valid length] (padding ignored), valid_length [n], texts: n strings."""
        for row, (n, text) in enumerate(zip(valid_length, texts, strict=True)):
            n = int(n)
            data = text.encode("utf-8", errors="surrogatepass")
            self._hash.update(np.array([n, len(data)], dtype="<i8").tobytes())
            self._hash.update(np.asarray(input_ids[row][:n], dtype="<i8").tobytes())
            self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def compute_shard_digest(path: str | os.PathLike) -> str:
    """The windows digest of one shard file, read from its `input_ids`, `valid_length` and `text` datasets."""
    digest = WindowDigest()
    try:
        # h5py directly: the shard writer records digests through this module, so shard_io cannot be imported here.
        with h5py.File(path, "r") as f:
            total = int(f[schema.VALID_LENGTH].shape[0])
            for lo in range(0, total, _ROWS_PER_READ):
                hi = min(total, lo + _ROWS_PER_READ)
                lengths = f[schema.VALID_LENGTH][lo:hi]
                if schema.WINDOW_BLOB in f:  # a compact window encoding: decoded (and checked) row by row
                    first, V = int(f.attrs[schema.ATTR_FIRST_SEQUENCE]) + lo, int(f.attrs[schema.ATTR_VOCAB_SIZE])
                    rows = [codec_window.decode_window(blob, int(n), V, sequence=first + i) for i, (blob, n)
                            in enumerate(zip(f[schema.WINDOW_BLOB][lo:hi], lengths, strict=True))]
                    ids, texts = [r[0] for r in rows], [r[1] for r in rows]
                else:
                    ids, texts = f[schema.INPUT_IDS][lo:hi], [encodings.decode_text(v) for v in f[schema.TEXT][lo:hi]]
                digest.update(ids, lengths, texts)
    except (OSError, KeyError, ValueError) as err:  # a damaged window blob is a CodecError (a ValueError)
        raise CacheError(f"{path}: cannot read its windows ({err}); run `cache_tools verify`") from err
    return digest.hexdigest()


def shard_digests(cache_dir: str | os.PathLike, manifest: schema.CacheManifest) -> list[str]:
    """Each shard's windows digest in sequence order: the recorded one (format version 3), else computed by reading
    the shard's ids and text."""
    shards = sorted(manifest.shards, key=lambda s: s.first_sequence)
    return [s.windows_digest or compute_shard_digest(Path(cache_dir) / s.file) for s in shards]


def _identity(m: schema.CacheManifest) -> dict[str, object]:
    """Manifest facts that decide what the windows are beyond their contents (attention across packed documents
    included, where the manifest records a packing mode)."""
    out: dict[str, object] = {"teacher tokenizer": m.tokenizer_hash, "max_length": m.max_length,
                              "sequences": m.num_sequences}
    for holder in (m, m.dataset):
        for name in ("packing", "packing_mode"):
            if getattr(holder, name, None) is not None:
                out["packing"] = str(getattr(holder, name))
    return out


def check_same_windows(caches: Sequence[tuple[str | os.PathLike, schema.CacheManifest]], role: str = "--cache") -> None:
    """Refuse (CacheMismatchError, one line naming both caches and the first difference) caches that do not cover
    the same windows: same teacher tokenizer, max_length, sequence count, shard boundaries and per-shard digests.
    Costs one manifest read per cache (format version 3), or one read of ids + text per older cache."""
    if len(caches) < 2:
        return
    first_dir, first = caches[0]
    first_shards = sorted(first.shards, key=lambda s: s.first_sequence)
    first_digests: list[str] | None = None
    for other_dir, other in caches[1:]:
        pair = f"{role} {first_dir} and {role} {other_dir}"
        a, b = _identity(first), _identity(other)
        for key in a.keys() | b.keys():
            if a.get(key) != b.get(key):
                raise CacheMismatchError(f"{pair} do not cover the same windows: {key} differs ({a.get(key)} vs "
                                         f"{b.get(key)}); build every teacher's cache from the same text with the "
                                         "same teacher tokenizer, --max-length and packing")
        other_shards = sorted(other.shards, key=lambda s: s.first_sequence)
        bounds = [(s.first_sequence, s.num_sequences) for s in first_shards]
        other_bounds = [(s.first_sequence, s.num_sequences) for s in other_shards]
        if bounds != other_bounds:
            at = next((i for i, (x, y) in enumerate(zip(bounds, other_bounds, strict=False)) if x != y),
                      min(len(bounds), len(other_bounds)))
            raise CacheMismatchError(f"{pair} split their windows into different shards (first at shard {at}); "
                                     "rebuild one with the other's --shard-size")
        if first_digests is None:
            first_digests = shard_digests(first_dir, first)
        other_digests = shard_digests(other_dir, other)
        for i, (x, y) in enumerate(zip(first_digests, other_digests, strict=True)):
            if x != y:
                raise CacheMismatchError(f"{pair} do not cover the same windows: shard {first_shards[i].file} vs "
                                         f"{other_shards[i].file} hold different ids or text; build every teacher's "
                                         "cache from the same text with the same teacher tokenizer and --max-length")
