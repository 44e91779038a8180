"""The only code that touches shard files (with the reader, which reads through the helpers here).

`ShardWriter` appends batches of windows to a temp file and, on `finish()`, trims it, writes its attributes, fsyncs,
renames it into place and writes the sidecar: an unfinished shard is only ever a `*.tmp`. Every dataset, shape,
dtype and chunking comes from `schema.DATASETS`; fields become stored datasets through `encodings.encode_batch`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache_tools.format import encodings, schema
from cache_tools.format.faults import fault_point
from cache_tools.format.windows import WindowDigest


class ShardWriter:
    """Append-only writer of one shard of the cache described by `manifest` (its targets, max_length, vocabulary,
    pooling and compression decide the layout; see `schema.DATASETS`)."""

    def __init__(self, cache_dir: str | os.PathLike, index: int, first_sequence: int, capacity: int,
                 manifest: schema.CacheManifest) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = index
        self.first_sequence = first_sequence
        self.capacity = capacity
        self.manifest = manifest
        self.final_path = self.cache_dir / schema.shard_name(index)
        self.tmp_path = self.final_path.with_name(self.final_path.name + schema.TMP_SUFFIX)
        self.count = 0
        self.num_tokens = 0
        self.digest = WindowDigest()
        self.specs = schema.datasets_for(manifest)
        comp = None if manifest.compression == "none" else manifest.compression
        self._file = h5py.File(self.tmp_path, "w")
        # Handles stay open for the writer's life: a temporary handle per write would be closed (and its chunk cache
        # flushed) right after a failed write (disk full), which HDF5 cannot do, and h5py then crashes (see `abort`).
        self._datasets: dict[str, h5py.Dataset] = {}
        for spec in self.specs:
            shape = (capacity, *spec.shape(manifest))
            self._datasets[spec.name] = self._file.create_dataset(
                spec.name, shape=shape, maxshape=shape, dtype=spec.dtype(manifest),
                chunks=spec.chunks(manifest, capacity), compression=comp if spec.compressed(manifest) else None)

    def append(self, batch: dict[str, Any]) -> None:
        """Append n windows: `batch` maps every field of the layout (see `encodings`) to leading dimension n."""
        n = len(batch[schema.VALID_LENGTH])
        if self.count + n > self.capacity:
            raise ValueError(f"shard {self.index}: {self.count} + {n} windows exceed capacity {self.capacity}")
        stored = encodings.encode_batch(self.manifest, batch, self.first_sequence + self.count)
        self.digest.update(batch[schema.INPUT_IDS], batch[schema.VALID_LENGTH], batch[schema.TEXT])
        lo, hi = self.count, self.count + n
        stored_rows = None
        if self.manifest.targets.assistant_only:
            lengths = np.asarray(batch[schema.VALID_LENGTH])
            masks = np.asarray(batch[schema.TARGET_MASK]).astype(bool)
            stored_rows = (masks & (np.arange(masks.shape[1])[None, :] < lengths[:, None])).sum(axis=1)
        for spec in self.specs:
            if stored_rows is not None and spec.sparse_rows(self.manifest):
                for row, count in enumerate(stored_rows.tolist()):  # the rest of the row stays unallocated (zeros)
                    if count:
                        self._datasets[spec.name][lo + row, :count] = stored[spec.name][row, :count]
            elif spec.is_vlen(self.manifest):
                # Element by element: h5py stacks equal-length arrays into a 2-D block and refuses the slice write.
                for row, value in enumerate(stored[spec.name]):
                    self._datasets[spec.name][lo + row] = value
            else:
                self._datasets[spec.name][lo:hi] = stored[spec.name]
        self.count = hi
        self.num_tokens += int(np.asarray(batch[schema.VALID_LENGTH]).sum())
        fault_point("shard.mid")

    def finish(self) -> schema.ShardInfo:
        """Trim to the windows written, write attributes, fsync, rename into place, write the sidecar."""
        for spec in self.specs:
            self._datasets[spec.name].resize(self.count, axis=0)
        attrs = {**schema.shard_attrs(self.manifest), schema.ATTR_SHARD_INDEX: self.index,
                 schema.ATTR_FIRST_SEQUENCE: self.first_sequence, schema.ATTR_NUM_SEQUENCES: self.count,
                 schema.ATTR_NUM_TOKENS: self.num_tokens}
        for key, value in attrs.items():
            self._file.attrs[key] = value
        self._file.flush()
        self._file.close()
        fault_point("shard.closed")
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        fault_point("shard.rename")
        os.replace(self.tmp_path, self.final_path)
        fault_point("shard.renamed")
        info = schema.ShardInfo(
            file=self.final_path.name,
            index=self.index,
            first_sequence=self.first_sequence,
            num_sequences=self.count,
            num_tokens=self.num_tokens,
            bytes=self.final_path.stat().st_size,
            sha256=schema.file_sha256(self.final_path),
            windows_digest=self.digest.hexdigest(),
        )
        write_sidecar(self.cache_dir, info, self.manifest.build_id)
        fault_point("shard.sidecar")
        return info

    def abort(self) -> None:
        """Close and delete the temp file (nothing half-written is left behind).

        The file is discarded, so its descriptor is first pointed at /dev/null: after a failed write (disk full,
        file-size limit) HDF5's flush on close fails again, and h5py then crashes the process (SIGSEGV/SIGBUS) while
        closing; writing the final flush to /dev/null lets the close succeed."""
        try:
            if self._file.id.valid:
                _discard_writes(self._file)
                # After a failed write HDF5 may still refuse to release some ids; the file is deleted anyway.
                with contextlib.suppress(Exception):
                    self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def _discard_writes(f: h5py.File) -> None:
    try:
        fd = f.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - drivers without a POSIX descriptor: close as is
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def write_sidecar(cache_dir: str | os.PathLike, info: schema.ShardInfo, build_id: str = "") -> None:
    """The sidecar: the shard's manifest entry plus the id of the build that wrote it (`--resume` keeps a shard only
    if its build id is the resumed build's; the manifest's shard entries keep the version 1 keys)."""
    schema.atomic_write_text(Path(cache_dir) / schema.shard_sidecar_name(info.index),
                             json.dumps({**dataclasses.asdict(info), "build_id": build_id}, indent=2, sort_keys=True)
                             + "\n")


# -- reading -------------------------------------------------------------------------------------------------------
def open_shard(path: str | os.PathLike, chunk_cache_bytes: int | None = None) -> h5py.File:
    """Open a finished shard read-only; a damaged or missing file is a CacheError naming it. `chunk_cache_bytes`:
    HDF5's chunk cache per open dataset (default 1 MiB)."""
    try:
        return h5py.File(path, "r", rdcc_nbytes=chunk_cache_bytes)
    except OSError as err:
        raise schema.CacheError(f"{path}: cannot open shard ({err}); run `cache_tools verify`") from err


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """A shard's attributes (counts, index, format version) as plain Python values."""
    with open_shard(path) as f:
        return {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in f.attrs.items()}


def read_row(f: h5py.File | Mapping[str, h5py.Dataset], m: schema.CacheManifest, row: int,
             specs: Sequence[schema.DatasetSpec] | None = None, valid_length: int | None = None) -> dict[str, Any]:
    """Every stored dataset of one sequence (or only those of `specs`, a subset of `schema.datasets_for(m)`; the
    valid length is always given), per-token ones trimmed to its valid length (text decoded to str). `f`: the open
    shard, or its datasets by name, opened once (an h5py lookup costs about as much as reading a small row);
    `valid_length`: the row's, when the caller has it already."""
    n = int(f[schema.VALID_LENGTH][row]) if valid_length is None else int(valid_length)
    out: dict[str, Any] = {schema.VALID_LENGTH: np.int32(n)}
    for spec in schema.datasets_for(m) if specs is None else specs:
        if spec.name == schema.VALID_LENGTH:
            continue
        value = f[spec.name][row, :n] if spec.per_token else f[spec.name][row]
        out[spec.name] = encodings.decode_text(value) if spec.name == schema.TEXT else value
    return out


def read_rows(f: h5py.File, m: schema.CacheManifest, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of every stored dataset as stored (padded to L; text decoded to an object array of str)."""
    out = {}
    for spec in schema.datasets_for(m):
        values = f[spec.name][lo:hi]
        if spec.name == schema.TEXT:
            values = np.array([encodings.decode_text(v) for v in values], dtype=object)
        out[spec.name] = values
    return out


def storage_bytes(f: h5py.File, m: schema.CacheManifest) -> dict[str, int]:
    """Bytes each dataset of an open shard occupies: allocated chunk storage, plus for variable-length datasets the
    heap payload (the sum of the stored arrays' lengths; HDF5 keeps vlen data outside the chunks)."""
    out = {}
    for spec in schema.datasets_for(m):
        ds = f[spec.name]
        size = int(ds.id.get_storage_size())
        if spec.is_vlen(m) and ds.shape[0]:
            size += sum(np.asarray(v).nbytes for v in ds[:])
        out[spec.name] = size
    return out
