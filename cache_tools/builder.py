"""`build_cache`: run the teacher over packed windows of a dataset and write the sparse cache (see `schema`).

Global window i goes to shard i // shard_size and rank r builds the shards with index % world_size == r. Every rank
tokenises the whole dataset (cheap next to the teacher) so window numbering needs no communication, and batches never
cross a shard, so a shard's bytes do not depend on the world size or on what was resumed (the batch size, which
decides each batch's padding, is part of the settings a resume must match)."""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cache_tools
from cache_tools import build_input, dist, output_dir, teacher
from cache_tools.build_options import BuildOptions, check_options, check_top_k
from cache_tools.format import packing, schema, text_data
from cache_tools.format.errors import BuildError
from cache_tools.progress import BuildProgress
from cache_tools.tokenizer_check import check_tokenizer
from cache_tools.writer_thread import BackgroundShardWriter, to_host

__all__ = ["BuildOptions", "build_cache"]


def _manifest(opts: BuildOptions, loaded: teacher.LoadedTeacher, pool_layers: list[int], dtype: str,
              targets: schema.TargetsInfo, plan: build_input.InputPlan) -> schema.CacheManifest:
    tok = loaded.tokenizer
    roles = ("bos", "eos", "pad", "unk")
    return schema.CacheManifest(
        builder_version=cache_tools.__version__,
        teacher=schema.TeacherInfo(name_or_path=opts.teacher, config_hash=loaded.config_hash,
                                   model_type=loaded.model_type, hidden_size=loaded.hidden_size,
                                   num_hidden_layers=loaded.num_layers, head_rows=loaded.head_rows),
        tokenizer=schema.TokenizerInfo(name_or_path=opts.tokenizer or opts.teacher,
                                       content_hash=schema.tokenizer_hash(tok), vocab_size=loaded.vocab_size,
                                       special_ids={r: getattr(tok, f"{r}_token_id", None) for r in roles},
                                       special_tokens={r: getattr(tok, f"{r}_token", None) for r in roles}),
        targets=targets,
        max_length=opts.max_length,
        id_dtype=str(schema.id_dtype_for(loaded.vocab_size)),
        pooling=schema.PoolingInfo(method="masked_mean", layers=pool_layers, hidden_size=loaded.hidden_size),
        dataset=build_input.dataset_info(opts, plan),
        compute_dtype=dtype,
        batch_size=opts.batch_size,
        shard_size=opts.shard_size,
        compression=opts.compression,
        window_encoding=schema.window_encoding_for(targets),
        packing=plan.packing,
    )


def _sampling(targets: schema.TargetsInfo, first_sequence: int, lengths: np.ndarray, longest: int
              ) -> teacher.Sampling:
    """Uniforms [B, longest, N] for a batch whose windows are global sequences first_sequence.. with `lengths` valid
    tokens: row i depends on (seed, global index) and its own length only, so a shard's samples do not depend on
    ranks, resume or the batch it shares."""
    N = targets.num_samples
    uniforms = torch.zeros((len(lengths), longest, N), dtype=torch.float64)
    for i, n in enumerate(lengths):
        uniforms[i, : int(n)] = teacher.sequence_uniforms(targets.seed, first_sequence + i, int(n), N)
    return teacher.Sampling(uniforms=uniforms, temperature=targets.sample_temperature)


def _pad(windows: list[packing.Window], length: int) -> dict[str, Any]:
    """Host-side arrays of a batch, padded to `length` (input_ids, offsets and masks 0 past valid_length)."""
    n = len(windows)
    ids = np.zeros((n, length), dtype=np.int64)
    offsets = np.zeros((n, length, 2), dtype=schema.OFFSET_DTYPE)
    masks = {name: np.zeros((n, length), dtype=schema.MASK_DTYPE) for name in (schema.ASSISTANT_MASK,
                                                                                schema.TARGET_MASK)}
    for row, w in enumerate(windows):
        ids[row, : len(w.input_ids)] = w.input_ids
        offsets[row, : len(w.input_ids)] = w.offsets
        if w.assistant_mask is not None:
            masks[schema.ASSISTANT_MASK][row, : len(w.input_ids)] = w.assistant_mask
            masks[schema.TARGET_MASK][row, : len(w.input_ids)] = w.target_mask
    conversational = windows[0].conversation is not None
    return {
        **(masks if conversational else {}),
        schema.SEGMENT_LENGTHS: [w.segment_lengths for w in windows],
        schema.CONVERSATION: [w.conversation for w in windows] if conversational else None,
        schema.INPUT_IDS: ids,
        schema.VALID_LENGTH: np.array([len(w.input_ids) for w in windows], dtype=np.int32),
        schema.DOC_INDEX: np.array([w.doc_index for w in windows], dtype=np.int64),
        schema.TEXT: [w.text for w in windows],
        schema.OFFSETS: offsets,
    }


@dataclass
class _ShardRun:
    """What every shard of one build shares."""

    opts: BuildOptions
    manifest: schema.CacheManifest
    loaded: teacher.LoadedTeacher
    writer: BackgroundShardWriter
    pool_layers: list[int]  # non-negative hidden_states indices
    device: torch.device
    progress: BuildProgress
    stats: dict[str, float]  # teacher_s, tokens, sequences, kept_shards


def _build_shard(run: _ShardRun, shard_windows: list[packing.Window], first_sequence: int) -> None:
    """Forward every batch of one shard; results go to the writer thread while the next batch runs."""
    opts, manifest, targets = run.opts, run.manifest, run.manifest.targets
    for lo in range(0, len(shard_windows), opts.batch_size):
        batch_windows = shard_windows[lo : lo + opts.batch_size]
        host = _pad(batch_windows, opts.max_length)
        longest = int(host[schema.VALID_LENGTH].max())  # forward only up to the longest window, pad on the host side
        ids = torch.from_numpy(host[schema.INPUT_IDS][:, :longest]).to(run.device)
        mask = (torch.arange(longest)[None, :] < torch.from_numpy(host[schema.VALID_LENGTH])[:, None]).to(run.device)
        start = time.perf_counter()
        sampling = None
        if targets.kind == "sampled":
            sampling = _sampling(targets, first_sequence + lo, host[schema.VALID_LENGTH], longest)
        out = teacher.teacher_batch(run.loaded, ids, mask.long(), run.pool_layers, targets.top_k,
                                    first_sequence=first_sequence + lo, sampling=sampling,
                                    segments=host[schema.SEGMENT_LENGTHS] if manifest.packing == "isolated" else None)
        # Narrow on the device (fewer bytes over PCIe); pad to L on the host while writing.
        device_batch = {name: t.to(_device_dtype(manifest, name, t.dtype)) for name, t in out.items()}
        copied, event = to_host(device_batch)
        run.stats["teacher_s"] += time.perf_counter() - start
        if longest < opts.max_length:
            copied = {name: t if name == schema.POOLED_HIDDEN else _PadLater(t, opts.max_length)
                      for name, t in copied.items()}
        run.writer.append({**host, **copied}, event)
        tokens = int(host[schema.VALID_LENGTH].sum())
        run.stats["tokens"] += tokens
        run.stats["sequences"] += len(batch_windows)
        run.progress.advance(batch_windows, tokens)


def _device_dtype(m: schema.CacheManifest, name: str, dtype: torch.dtype) -> torch.dtype:
    """What to narrow a teacher output to before the device->host copy: int64 ids/counts -> int32 (ids < 2**31),
    floats -> the stored dtype when the layout stores that field as a plain array (fp16), else kept (a codec gets
    fp32)."""
    if dtype == torch.int64:
        return torch.int32
    spec = next((s for s in schema.datasets_for(m) if s.name == name), None)
    if dtype.is_floating_point and spec is not None and not spec.is_vlen(m):
        return getattr(torch, spec.dtype(m).name)
    return dtype


class _PadLater:
    """A [B, T, ...] host tensor that the writer thread pads to [B, L, ...] (zeros) after the copy completed."""

    def __init__(self, tensor: torch.Tensor, length: int) -> None:
        self.tensor, self.length = tensor, length

    def numpy(self) -> np.ndarray:
        array = self.tensor.numpy()
        padded = np.zeros((array.shape[0], self.length, *array.shape[2:]), dtype=array.dtype)
        padded[:, : array.shape[1]] = array
        return padded


def build_cache(opts: BuildOptions) -> dict[str, Any]:
    """Build (or resume) the cache described by `opts`. Returns summary stats; raises BuildError on bad input."""
    wall_start = time.perf_counter()
    targets = check_options(opts)  # the options' one check, before anything is loaded or locked
    info = dist.init_distributed()
    # Only rank 0 locks: the other ranks are part of the same build. Taken before anything is loaded: refuse at once.
    lock = output_dir.BuildLock(Path(opts.output).expanduser()) if info.is_main else None
    try:
        return _build(opts, targets, info, wall_start)
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown(info)


def _build(opts: BuildOptions, targets: schema.TargetsInfo, info: dist.DistInfo, wall_start: float) -> dict[str, Any]:
    out_dir = Path(opts.output).expanduser()
    device = dist.pick_device(opts.device, info)
    dtype = teacher.resolve_dtype(opts.dtype, device)
    config, tokenizer = teacher.load_config_and_tokenizer(opts.teacher, opts.tokenizer, opts.trust_remote_code)
    check_top_k(targets, len(tokenizer))
    pool_layers = teacher.check_settings(config, tokenizer, max_length=opts.max_length, pool_layers=opts.pool_layers)
    if opts.tokenizer:
        check_tokenizer(opts.teacher, opts.tokenizer, config, tokenizer, trust_remote_code=opts.trust_remote_code,
                        allow_mismatch=opts.allow_tokenizer_mismatch)
    rows = schema.RowsInfo()
    plan = build_input.plan_input(opts, tokenizer)
    targets.assistant_only = plan.assistant_only
    windows = build_input.windows(opts, tokenizer, plan, rows)
    loaded = teacher.load_teacher(opts.teacher, opts.tokenizer, trust_remote_code=opts.trust_remote_code,
                                  dtype=dtype, device=device)
    manifest = _manifest(opts, loaded, pool_layers, dtype, targets, plan)
    if not _start_output(out_dir, manifest, tokenizer, opts, info):
        done = schema.load_manifest(out_dir)
        if info.is_main:
            print(f"cache_tools: {out_dir} is already complete ({done.num_sequences} sequences); nothing to do",
                  file=sys.stderr)
        return {"num_sequences": done.num_sequences, "num_tokens": done.num_tokens, "skipped": True}
    load_s = time.perf_counter() - wall_start

    total_rows = text_data.row_count(opts.dataset, opts.split, opts.streaming, opts.max_samples)
    progress = BuildProgress(total_rows, enabled=opts.progress and info.is_main, rank=info.rank)
    run = _ShardRun(opts, manifest, loaded, BackgroundShardWriter(out_dir, manifest), pool_layers, device, progress,
                    {"teacher_s": 0.0, "tokens": 0, "sequences": 0, "kept_shards": 0})
    build_start = time.perf_counter()
    total_windows = _build_shards(run, windows, out_dir, info)
    build_s = time.perf_counter() - build_start
    dist.barrier(info)  # every rank's shards are on disk
    result = {"load_s": load_s, "build_s": build_s, "writer_wait_s": run.writer.wait_s, **run.stats}
    if info.is_main:
        result.update(build_input.report(plan, rows))
        kept = int(run.stats["kept_shards"]) if info.world_size == 1 else 0  # other ranks count their own
        result.update(_finish_manifest(out_dir, manifest, rows, total_windows, wall_start, kept))
    dist.barrier(info)
    return result


def _start_output(out_dir: Path, manifest: schema.CacheManifest, tokenizer: Any, opts: BuildOptions,
                  info: dist.DistInfo) -> bool:
    """Decide what to do with the output folder (every rank agrees) and prepare it; False when it is already
    complete. Every rank leaves with the build id its sidecars must carry."""
    output_plan = output_dir.plan_output(out_dir, manifest, resume=opts.resume, overwrite=opts.overwrite)
    dist.barrier(info)  # every rank has decided before rank 0 changes the folder
    if output_plan == "done":
        return False
    if info.is_main:
        output_dir.start_build(out_dir, manifest, output_plan)  # build id, screened shards, unfinished manifest
        output_dir.save_tokenizer(out_dir, tokenizer)
    dist.barrier(info)
    if not info.is_main:
        manifest.build_id = schema.load_manifest(out_dir).build_id  # the sidecars this rank writes carry it
    return True


def _build_shards(run: _ShardRun, windows: Iterator[packing.Window], out_dir: Path, info: dist.DistInfo) -> int:
    """Build this rank's unfinished shards (global window i is in shard i // shard_size, built by rank
    shard % world_size); returns how many windows the dataset has."""
    shard_size, total_windows = run.opts.shard_size, 0
    try:
        for shard_index, group in itertools.groupby(enumerate(windows), key=lambda pair: pair[0] // shard_size):
            shard_windows = [w for _, w in group]
            total_windows += len(shard_windows)
            if shard_index % info.world_size != info.rank:
                continue
            kept = output_dir.finished_shard(out_dir, shard_index, run.manifest.build_id)
            if kept is not None:  # an interrupted build's finished shard: counted, so the bar resumes where it was
                run.stats["kept_shards"] += 1
                run.progress.keep(shard_windows, kept.num_tokens)
                continue
            run.writer.open_shard(shard_index, shard_index * shard_size, shard_size)
            _build_shard(run, shard_windows, shard_index * shard_size)
            run.writer.finish_shard()
        run.writer.close()
    except BaseException:
        run.writer.abort()
        raise
    finally:
        run.progress.close()
    return total_windows


def _finish_manifest(out_dir: Path, manifest: schema.CacheManifest, rows: schema.RowsInfo, total_windows: int,
                     wall_start: float, kept: int = 0) -> dict[str, Any]:
    """Rank 0, after every rank's shards are on disk: record them and mark the manifest complete (written last: its
    presence with complete=true means every shard is there). Returns the summary numbers."""
    num_shards = math.ceil(total_windows / manifest.shard_size)
    shards = []
    for index in range(num_shards):
        shard = output_dir.finished_shard(out_dir, index, manifest.build_id)
        if shard is None:
            raise BuildError(f"{out_dir / schema.shard_name(index)}: missing after the build (did a rank fail?); "
                             "rerun with --resume")
        shards.append(shard)
    manifest.shards = shards
    manifest.num_sequences = sum(s.num_sequences for s in shards)
    manifest.num_tokens = sum(s.num_tokens for s in shards)
    manifest.complete = True
    manifest.rows = rows
    manifest.save(out_dir)
    bytes_per_token = sum(s.bytes for s in shards) / max(1, manifest.num_tokens)
    wall = time.perf_counter() - wall_start
    print(f"cache_tools: {manifest.num_sequences} sequences, {manifest.num_tokens} tokens, "
          f"{bytes_per_token:.1f} bytes/token, {num_shards} shards"
          + (f" ({kept} kept from the interrupted build, {num_shards - kept} built now)" if kept else "")
          + f", {wall:.1f}s wall -> {out_dir}", file=sys.stderr)
    return {"num_sequences": manifest.num_sequences, "num_tokens": manifest.num_tokens,
            "bytes_per_token": bytes_per_token, "wall_s": wall, "num_shards": num_shards}
