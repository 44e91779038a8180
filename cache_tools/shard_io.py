"""Writing one shard: `ShardWriter` appends batches of windows to a temp file and, on `finish()`, trims it, writes
its attributes, fsyncs, renames it into place and writes the sidecar. An unfinished shard is only ever a `*.tmp`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py
import numpy as np

from cache_tools import schema
from cache_tools.faults import fault_point


class ShardWriter:
    """Append-only writer of one shard (see `cache_tools.schema` for the layout).

    Chunks are one sequence each for the per-token datasets, so a reader fetching a sequence (or a contiguous run of
    them) touches exactly the chunks it needs.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        index: int,
        first_sequence: int,
        capacity: int,
        *,
        max_length: int,
        top_k: int,
        vocab_size: int,
        pooled_shape: tuple[int, int],
        compression: str = "none",
        pool_layers: list[int] | None = None,
        build_id: str = "",
    ) -> None:
        self.build_id = build_id
        self.cache_dir = Path(cache_dir)
        self.index = index
        self.first_sequence = first_sequence
        self.capacity = capacity
        self.final_path = self.cache_dir / schema.shard_name(index)
        self.tmp_path = self.final_path.with_name(self.final_path.name + schema.TMP_SUFFIX)
        self.count = 0
        self.num_tokens = 0
        id_dtype = schema.id_dtype_for(vocab_size)
        comp = None if compression == "none" else compression
        L, K = max_length, top_k
        P, H = pooled_shape
        self._file = h5py.File(self.tmp_path, "w")
        self._attrs = {
            schema.ATTR_FORMAT_VERSION: schema.FORMAT_VERSION,
            schema.ATTR_SHARD_INDEX: index,
            schema.ATTR_FIRST_SEQUENCE: first_sequence,
            schema.ATTR_TOP_K: K,
            schema.ATTR_MAX_LENGTH: L,
            schema.ATTR_VOCAB_SIZE: vocab_size,
            schema.ATTR_POOL_LAYERS: np.asarray(pool_layers or [], dtype=np.int64),
        }
        specs = {
            schema.INPUT_IDS: ((L,), id_dtype),
            schema.VALID_LENGTH: ((), np.int32),
            schema.DOC_INDEX: ((), np.int64),
            schema.TEXT: ((), h5py.string_dtype("utf-8")),
            schema.OFFSETS: ((L, 2), schema.OFFSET_DTYPE),
            schema.TOPK_IDS: ((L, K), id_dtype),
            schema.TOPK_LOGPROBS: ((L, K), schema.LOGPROB_DTYPE),
            schema.TAIL_LOGPROB: ((L,), schema.TAIL_DTYPE),
            schema.POOLED_HIDDEN: ((P, H), schema.POOLED_DTYPE),
        }
        self._datasets: dict[str, h5py.Dataset] = {}
        for name, (tail_shape, dtype) in specs.items():
            # Scalars per sequence are chunked in runs so the small datasets don't explode into tiny chunks.
            chunks = (1, *tail_shape) if tail_shape else (min(capacity, 1024),)
            # Handles stay open for the writer's life: a temporary handle per write would be closed (and its chunk
            # cache flushed) right after a failed write, and HDF5 cannot close it then (see `abort`).
            self._datasets[name] = self._file.create_dataset(
                name,
                shape=(capacity, *tail_shape),
                maxshape=(capacity, *tail_shape),
                dtype=dtype,
                chunks=chunks,
                compression=comp if tail_shape else None,
            )

    def append(self, batch: dict[str, object]) -> None:
        """Append n windows. `batch` maps every dataset name to an array with leading dimension n (`text`: list)."""
        n = len(batch[schema.VALID_LENGTH])  # type: ignore[arg-type]
        if self.count + n > self.capacity:
            raise ValueError(f"shard {self.index}: {self.count} + {n} windows exceed capacity {self.capacity}")
        lo, hi = self.count, self.count + n
        for name in schema.ALL_DATASETS:
            self._datasets[name][lo:hi] = batch[name]
        self.count = hi
        self.num_tokens += int(np.asarray(batch[schema.VALID_LENGTH]).sum())
        fault_point("shard.mid")

    def finish(self) -> schema.ShardInfo:
        """Trim to the windows written, write attributes, fsync, rename into place, write the sidecar."""
        for name in schema.ALL_DATASETS:
            ds = self._datasets[name]
            ds.resize(self.count, axis=0)
        attrs = dict(self._attrs)
        attrs[schema.ATTR_NUM_SEQUENCES] = self.count
        attrs[schema.ATTR_NUM_TOKENS] = self.num_tokens
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
            build_id=self.build_id,
        )
        write_sidecar(self.cache_dir, info)
        fault_point("shard.sidecar")
        return info

    def abort(self) -> None:
        """Close and delete the temp file (nothing half-written is left behind).

        The file is discarded, so its descriptor is first pointed at /dev/null: after a failed write (disk full,
        file-size limit) HDF5's flush on close fails again, and h5py then crashes the process (SIGSEGV) while
        deallocating; writing the final flush to /dev/null lets the close succeed."""
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


def write_sidecar(cache_dir: str | os.PathLike, info: schema.ShardInfo) -> None:
    import dataclasses
    import json

    schema.atomic_write_text(
        Path(cache_dir) / schema.shard_sidecar_name(info.index),
        json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True) + "\n",
    )
