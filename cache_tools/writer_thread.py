"""Background shard writing: the main thread queues device->host copies and moves on to the next teacher forward;
this thread waits for each copy and appends to the open `ShardWriter` (which encodes to the on-disk layout of
`schema.DATASETS`), so encoding and HDF5 I/O overlap with the teacher and the build stays teacher-bound. The queue
is bounded so a slow disk applies back-pressure instead of letting host memory grow."""

from __future__ import annotations

import os
import queue
import re
import threading
from pathlib import Path
from typing import Any

import torch

from cache_tools.format import schema
from cache_tools.format.errors import UserError
from cache_tools.format.shard_io import ShardWriter

_STOP = object()


def to_host(device_batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """Start async copies of `device_batch` into pinned host tensors; returns (host tensors, event or None)."""
    first = next(iter(device_batch.values()))
    if first.device.type != "cuda":
        return device_batch, None
    host = {}
    for name, tensor in device_batch.items():
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor, non_blocking=True)
        host[name] = pinned
    event = torch.cuda.Event()
    event.record()
    return host, event


def _errno_in(message: str) -> int | None:
    found = re.search(r"errno = (\d+)", message)
    return int(found.group(1)) if found else None


class BackgroundShardWriter:
    """Owns at most one open `ShardWriter` at a time; all calls are queued and run in order on the writer thread."""

    def __init__(self, cache_dir: str | Path, manifest: schema.CacheManifest, queue_size: int = 4) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.finished: list[schema.ShardInfo] = []
        self.wait_s = 0.0  # time the producer spent blocked on a full queue (writer-bound time)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._error_path: Path = self.cache_dir
        self._writer: ShardWriter | None = None
        self._thread = threading.Thread(target=self._run, name="cache-shard-writer", daemon=True)
        self._thread.start()

    # -- producer side ------------------------------------------------------------------------------------------
    def _put(self, item: Any) -> None:
        self._raise_if_failed()
        import time

        start = time.perf_counter()
        self._queue.put(item)
        self.wait_s += time.perf_counter() - start

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, UserError):
            raise self._error  # bad data: its one-line error names the file
        # Disk full, file-size limit, permissions: one line naming the shard. HDF5 raises OSError on a failed write
        # (its text many lines long, no file name) but RuntimeError on a failed close, the errno only in its text.
        if isinstance(self._error, OSError) and self._error.filename:
            raise self._error  # run_cli turns it into one line naming the file
        code = getattr(self._error, "errno", None) or _errno_in(str(self._error))
        if code:
            raise OSError(code, os.strerror(code), str(self._error_path)) from self._error
        if self._error is not None:
            raise RuntimeError(f"shard writer failed: {self._error}") from self._error

    def open_shard(self, index: int, first_sequence: int, capacity: int) -> None:
        self._put(("open", (index, first_sequence, capacity)))

    def append(self, host_batch: dict[str, Any], event: Any = None) -> None:
        """`host_batch`: every dataset of the layout; tensors may still be copying until `event` completes."""
        self._put(("append", (host_batch, event)))

    def finish_shard(self) -> None:
        self._put(("finish", None))

    def close(self) -> list[schema.ShardInfo]:
        """Drain the queue, stop the thread, re-raise any writer error. Returns the shards finished."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()
        return self.finished

    def abort(self) -> None:
        """Stop without finishing: the open shard stays a *.tmp and is deleted."""
        self._queue.put(("abort", None))
        self._queue.put(_STOP)
        self._thread.join()

    # -- writer thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None and item[0] != "abort":
                continue  # keep draining so the producer never blocks on a dead consumer
            try:
                self._handle(*item)
            except BaseException as err:  # noqa: B036 - reported to the producer, which re-raises it
                self._error = err
                if self._writer is not None:
                    self._error_path = self._writer.tmp_path
                    self._writer.abort()
                    self._writer = None

    def _handle(self, op: str, arg: Any) -> None:
        if op == "open":
            index, first_sequence, capacity = arg
            self._writer = ShardWriter(self.cache_dir, index, first_sequence, capacity, self.manifest)
        elif op == "append":
            host_batch, event = arg
            if event is not None:
                event.synchronize()
            self._writer.append(self._numpy(host_batch))
        elif op == "finish":
            self.finished.append(self._writer.finish())
            self._writer = None
        elif op == "abort" and self._writer is not None:
            self._writer.abort()
            self._writer = None

    @staticmethod
    def _numpy(batch: dict[str, Any]) -> dict[str, Any]:
        """Host tensors (and deferred pads) as numpy arrays; the writer converts them to the on-disk dtypes."""
        return {name: value.numpy() if hasattr(value, "numpy") else value for name, value in batch.items()}
