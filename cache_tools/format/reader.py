"""`TeacherCacheReader`: random access to a finished teacher cache by global sequence index.

HDF5 file handles must not cross a fork (DataLoader workers) or be pickled (spawn workers), so handles are opened
lazily, per process: the reader remembers the pid that opened them and reopens after a fork; pickling drops them.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cache_tools.format import encodings, schema, shard_check, shard_io

# HDF5 chunk cache per open dataset. The reader keeps every shard's datasets open, so the default (1 MiB each) would
# grow with the shards read; this holds a chunk of per-sequence scalars or blob references (1024 rows, read by
# neighbouring sequences), while a per-window array chunk, read once per epoch, bypasses it.
READ_CHUNK_CACHE = 64 * 1024


@dataclass
class CachedSequence:
    """One window, trimmed to its valid length n (K = `reader.slots`, P = pooled layers, H = teacher hidden
    size). The same fields for every target kind and encoding: a sampled cache gives the distinct sampled ids
    (-1 padding), log(count / N) and a tail of -inf (see `encodings.Targets`). Format 3 fields (see `schema`):
    `segment_lengths` of the pieces packed in the window (older caches: one segment [n]); `assistant_mask` (None for
    plain-text caches); `target_mask` (all True unless the cache stores targets only where the next token is
    assistant content; elsewhere topk_ids are -1); `conversation` (the pieces' messages and content spans, None for
    plain text)."""

    index: int
    input_ids: np.ndarray  # [n] int64
    offsets: np.ndarray  # [n, 2] int32
    topk_ids: np.ndarray  # [n, K] int64, -1 = empty slot
    topk_logprobs: np.ndarray  # [n, K] float32
    tail_logprob: np.ndarray  # [n] float32
    pooled_hidden: np.ndarray  # [P, H] float16
    text: str
    doc_index: int
    segment_lengths: np.ndarray | None = None  # [d] int32; None only when built by hand (read as [n])
    assistant_mask: np.ndarray | None = None  # [n] bool
    target_mask: np.ndarray | None = None  # [n] bool; None only when built by hand (read as all True)
    conversation: list[dict] | None = None

    def __post_init__(self) -> None:
        n = int(self.input_ids.shape[0])
        if self.segment_lengths is None:
            self.segment_lengths = np.array([n], dtype=np.int32)
        if self.target_mask is None:
            self.target_mask = np.ones(n, dtype=bool)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class CachedTargets:
    """One window's teacher targets and the masks that place them, without the window itself (`read_targets`): what
    a second cache over the same windows adds. Fields as in `CachedSequence`."""

    index: int
    topk_ids: np.ndarray  # [n, K] int64
    topk_logprobs: np.ndarray  # [n, K] float32
    tail_logprob: np.ndarray  # [n] float32
    target_mask: np.ndarray  # [n] bool
    assistant_mask: np.ndarray | None = None  # [n] bool

    @property
    def length(self) -> int:
        return int(self.topk_ids.shape[0])


class TeacherCacheReader:
    """Read-only view of a cache directory. `len(reader)` sequences, indexed 0..len-1 across all shards.

    Args:
        cache_dir: the directory holding `manifest.json` and the shards.
        require_complete: refuse (CacheError) a cache whose build has not finished.
        check_finite: raise CacheError when a read sequence holds NaN/Inf targets (caught at load, not as a NaN loss).
        verify_shards: check each shard's size and sha256 before this process first reads it (`shard_check`): any
            damaged byte of a shard is refused, not read. Training turns it on.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, require_complete: bool = True, check_finite: bool = True,
                 verify_shards: bool = False):
        self.cache_dir = Path(cache_dir)
        self.manifest = schema.load_manifest(self.cache_dir)
        if require_complete and not self.manifest.complete:
            raise CacheError(
                f"{self.cache_dir / schema.MANIFEST_NAME}: cache is incomplete; finish it with "
                "`cache_tools build-cache ... --resume`"
            )
        self.check_finite = check_finite
        self.shards = sorted(self.manifest.shards, key=lambda s: s.first_sequence)
        for shard in self.shards:
            if not (self.cache_dir / shard.file).is_file():
                raise CacheError(f"{self.cache_dir / shard.file}: shard listed in the manifest is missing; rebuild "
                                 "with `cache_tools build-cache --resume`")
        self._starts = [s.first_sequence for s in self.shards]
        self._specs = schema.datasets_for(self.manifest)
        self._target_specs = encodings.target_datasets(self.manifest)
        self._handles: dict[int, h5py.File] = {}
        # Per open shard: its datasets, opened once (each h5py lookup costs about as much as a small read), and
        # every row's valid length, read once.
        self._datasets: dict[int, dict[str, h5py.Dataset]] = {}
        self._lengths: dict[int, np.ndarray] = {}
        self._pid = os.getpid()
        self._checksums = shard_check.ShardChecksums(self.cache_dir) if verify_shards else None

    # -- pickling / fork safety -------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_datasets"], state["_lengths"] = {}, {}, {}
        del state["_specs"], state["_target_specs"]  # the schema's table rows hold lambdas: rebuilt on unpickling
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._specs = schema.datasets_for(self.manifest)
        self._target_specs = encodings.target_datasets(self.manifest)

    def _file(self, shard_pos: int) -> h5py.File:
        if self._pid != os.getpid():
            # Inherited through fork: never touch the parent's handles, just forget them.
            self._handles, self._datasets, self._lengths = {}, {}, {}
            self._pid = os.getpid()
        if self._checksums is not None:  # a stat per read once verified; a shard changed since is hashed again
            self._checksums.check(self.shards[shard_pos])
        handle = self._handles.get(shard_pos)
        if handle is None:
            handle = shard_io.open_shard(self.cache_dir / self.shards[shard_pos].file, READ_CHUNK_CACHE)
            self._handles[shard_pos] = handle
            self._datasets.pop(shard_pos, None)
            self._lengths.pop(shard_pos, None)
        return handle

    def _row(self, pos: int, row: int, specs: tuple[schema.DatasetSpec, ...]) -> tuple[dict, int]:
        """(the datasets `specs` of row `row` of shard `pos`, as `shard_io.read_row` gives them; its valid length)."""
        handle = self._file(pos)
        datasets = self._datasets.get(pos)
        if datasets is None:
            datasets = self._datasets[pos] = {spec.name: handle[spec.name] for spec in self._specs}
            self._lengths[pos] = datasets[schema.VALID_LENGTH][:]
        n = int(self._lengths[pos][row])
        return shard_io.read_row(datasets, self.manifest, row, specs, valid_length=n), n

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles, self._datasets, self._lengths = {}, {}, {}

    # -- access ----------------------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.manifest.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def slots(self) -> int:
        return self.manifest.slots

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def __len__(self) -> int:
        return self.num_sequences

    def locate(self, index: int) -> tuple[int, int]:
        """Global sequence index -> (position in `self.shards`, row within that shard)."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range [0, {self.num_sequences})")
        pos = bisect.bisect_right(self._starts, index) - 1
        return pos, index - self.shards[pos].first_sequence

    def __getitem__(self, index: int) -> CachedSequence:
        pos, row = self.locate(int(index))
        shard_file = self.shards[pos].file
        try:
            raw, n = self._row(pos, row, self._specs)
            raw = encodings.with_window(self.manifest, raw, n, int(index))
            targets = encodings.decode_targets(self.manifest, raw, n, int(index))
            offsets = encodings.decode_offsets(self.manifest, raw, n, int(index))
            extra = encodings.decode_packing(self.manifest, raw, n)
        except (OSError, ValueError, KeyError) as err:  # truncated file, damaged blob, dataset missing
            raise CacheError(f"{self.cache_dir / shard_file}: sequence {index} (row {row}) unreadable ({err}); run "
                             "`cache_tools verify` and rebuild that shard") from err
        seq = CachedSequence(
            index=int(index),
            input_ids=raw[schema.INPUT_IDS].astype(np.int64),
            offsets=offsets,
            topk_ids=targets.ids,
            topk_logprobs=targets.logprobs,
            tail_logprob=targets.tail,
            pooled_hidden=raw[schema.POOLED_HIDDEN],
            text=raw[schema.TEXT],
            doc_index=int(raw[schema.DOC_INDEX]),
            **extra,
        )
        if self.check_finite:
            self._check_finite(seq, shard_file, row, sampled=self.manifest.targets.kind == "sampled")
        return seq

    def read_targets(self, index: int) -> CachedTargets:
        """Sequence `index`'s targets and masks only (`encodings.target_datasets`): for a cache whose windows
        the caller already has from another cache over the same windows (`windows.check_same_windows`). Checked for
        NaN/Inf like `reader[i]` when `check_finite`."""
        pos, row = self.locate(int(index))
        shard_file = self.shards[pos].file
        try:
            raw, n = self._row(pos, row, self._target_specs)
            targets = encodings.decode_targets(self.manifest, raw, n, int(index))
            masks = encodings.decode_masks(self.manifest, raw, n)
        except (OSError, ValueError, KeyError) as err:
            raise CacheError(f"{self.cache_dir / shard_file}: sequence {index} (row {row}) unreadable ({err}); run "
                             "`cache_tools verify` and rebuild that shard") from err
        out = CachedTargets(int(index), targets.ids, targets.logprobs, targets.tail, **masks)
        if self.check_finite:
            self._check_finite(out, shard_file, row, sampled=self.manifest.targets.kind == "sampled")
        return out

    def read_slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Contiguous run [start, stop) of every STORED dataset (padded, leading dim stop-start; text as str),
        reading whole chunks per shard. Compact caches give their blobs here (targets and offsets); `reader[i]`
        decodes."""
        if not 0 <= start <= stop <= self.num_sequences:
            raise IndexError(f"slice [{start}, {stop}) out of range [0, {self.num_sequences}]")
        names = schema.dataset_names(self.manifest)
        if start == stop:
            return {name: np.empty((0,)) for name in names}
        parts: dict[str, list] = {name: [] for name in names}
        i = start
        while i < stop:
            pos, row = self.locate(i)
            take = min(stop - i, self.shards[pos].num_sequences - row)
            for name, values in shard_io.read_rows(self._file(pos), self.manifest, row, row + take).items():
                parts[name].append(values)
            i += take
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    @staticmethod
    def _check_finite(seq: CachedSequence | CachedTargets, shard_file: str, row: int, *, sampled: bool) -> None:
        tail_ok = sampled or np.isfinite(seq.tail_logprob).all()  # a sampled tail is -inf by definition
        if not np.isfinite(seq.topk_logprobs).all() or not tail_ok:
            raise CacheError(
                f"{shard_file}: sequence {seq.index} (row {row}) holds NaN/Inf teacher log-probs; "
                "run `cache_tools verify` and rebuild that shard"
            )
        if isinstance(seq, CachedSequence) and not np.isfinite(seq.pooled_hidden).all():
            raise CacheError(
                f"{shard_file}: sequence {seq.index} (row {row}) holds NaN/Inf pooled hidden states "
                "(fp16 overflow in the teacher?); rebuild with --dtype fp32 or bf16"
            )


CacheError = schema.CacheError
