"""`cache_tools convert SRC DST --encoding fp16|compact`: rewrite a finished cache in another target encoding (or an
older format's compact blobs as format 3 blobs) without the teacher.

Every sequence is read and decoded as the reader does (a damaged source row stops the conversion with the reader's
one-line error), re-encoded and written through the same `ShardWriter` as a build, shard by shard, so DST is a
normal cache of the current format: same windows, text, offsets, pooled states and sequence indices, targets in the
new encoding. The output folder follows build-cache's rules (lock, temp files, sidecars with this conversion's build
id): rerunning an interrupted conversion keeps the shards it finished and verified, and a finished DST is checked with
`verify` before its manifest says complete. Lossless where both encodings are: ids, offsets and sampled targets
always; top-k log-probs are exact from compact to compact, fp16 rounds compact levels and compact quantises fp16
values (the same 7-bit levels a compact build stores).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools import output_dir
from cache_tools.format import encodings, schema, shard_io
from cache_tools.format.errors import BuildError, CacheError

_ROWS_PER_APPEND = 64  # bounds memory on big shards
# Fields handed to the writer as lists (variable length).
_LISTS = (schema.TEXT, schema.TOPK_BLOB, schema.SEGMENT_LENGTHS, schema.CONVERSATION)
_BLOBS = (schema.TOPK_BLOB, schema.SAMPLE_BLOB, schema.OFFSETS_BLOB, schema.WINDOW_BLOB)  # re-encoded, never copied


def _say(message: str) -> None:
    print(f"cache_tools convert: {message}", file=sys.stderr, flush=True)


def _padded(value: np.ndarray, length: int, fill: int | float = 0) -> np.ndarray:
    out = np.full((length, *value.shape[1:]), fill, dtype=value.dtype)
    out[: value.shape[0]] = value
    return out


def target_manifest(src: schema.CacheManifest, encoding: str) -> schema.CacheManifest:
    """DST's manifest before any shard: SRC's settings in the current format with the new encoding."""
    data = json.loads(src.to_json())
    data.update(format_version=schema.FORMAT_VERSION, complete=False, shards=[], num_sequences=0, num_tokens=0,
                build_id="")
    data["targets"]["encoding"] = encoding
    data["window_encoding"] = schema.window_encoding_for(schema.TargetsInfo(**data["targets"]))
    return schema.CacheManifest.from_dict(data, "converted manifest")


def _row_fields(src: schema.CacheManifest, dst: schema.CacheManifest, raw: dict[str, Any],
                sequence: int) -> dict[str, Any]:
    """One source row (as `shard_io.read_row` gives it) -> the fields `ShardWriter.append` takes, padded to L."""
    n, L = int(raw[schema.VALID_LENGTH]), dst.max_length
    raw = encodings.with_window(src, raw, n, sequence)
    targets = encodings.decode_targets(src, raw, n, sequence)
    fields: dict[str, Any] = {
        schema.OFFSETS: _padded(encodings.decode_offsets(src, raw, n, sequence), L),
        schema.TEXT: raw[schema.TEXT],
        schema.INPUT_IDS: _padded(np.asarray(raw[schema.INPUT_IDS])[:n], L),
    }
    if src.targets.kind == "topk":  # expanded like the other targets (assistant-only caches store fewer positions)
        fields[schema.TAIL_LOGPROB] = _padded(targets.tail, L)
    if src.targets.kind == "topk" and src.targets.encoding == dst.targets.encoding == "compact":
        stored = int(encodings.target_mask(src, raw, n).sum())  # an assistant-only blob covers only those
        fields[schema.TOPK_BLOB] = _carry_levels(src, raw, stored, sequence)  # re-quantising would move some levels
    elif src.targets.kind == "topk":
        fields[schema.TOPK_IDS] = _padded(targets.ids, L)
        fields[schema.TOPK_LOGPROBS] = _padded(targets.logprobs, L)
    else:
        fields[schema.SAMPLE_IDS] = _padded(targets.ids, L, -1)
        fields[schema.SAMPLE_COUNTS] = _padded(targets.counts, L)
    for spec in schema.datasets_for(dst):  # every other dataset is copied as stored
        if spec.name not in fields and spec.name not in _BLOBS \
                and spec.name in raw:  # an older source lacks the format 3 datasets (encode_batch defaults them)
            value = np.asarray(raw[spec.name])
            fields[spec.name] = _padded(value, L) if spec.per_token else value
    return fields


def _carry_levels(src: schema.CacheManifest, raw: dict[str, Any], n: int, sequence: int) -> np.ndarray:
    """A compact top-k blob of either format rewritten as this row's format 3 blob with the very same levels."""
    from cache_tools.format import codec, codec_zstd

    blob, K, V = raw[schema.TOPK_BLOB], src.targets.top_k, src.vocab_size
    if src.format_version >= encodings.ZSTD_VERSION:
        steps, levels, lp_max, ranges, bits = codec_zstd.topk_parts(blob, n, K, V, sequence=sequence)
        ids = np.cumsum(steps.astype(np.int64), axis=1)
    else:
        ids, levels, lp_max, ranges, bits = codec.topk_levels(blob, n, K, V)
    return codec_zstd.encode_topk_levels(ids, levels, lp_max, ranges, bits, sequence=sequence)


def _convert_shard(src_dir: Path, src: schema.CacheManifest, out: Path, dst: schema.CacheManifest,
                   shard: schema.ShardInfo) -> schema.ShardInfo:
    writer = shard_io.ShardWriter(out, shard.index, shard.first_sequence, shard.num_sequences, dst)
    try:
        with shard_io.open_shard(src_dir / shard.file) as f:
            for lo in range(0, shard.num_sequences, _ROWS_PER_APPEND):
                rows = []
                for row in range(lo, min(shard.num_sequences, lo + _ROWS_PER_APPEND)):
                    sequence = shard.first_sequence + row
                    try:
                        rows.append(_row_fields(src, dst, shard_io.read_row(f, src, row), sequence))
                    except (OSError, ValueError, KeyError) as err:
                        raise CacheError(f"{src_dir / shard.file}: sequence {sequence} (row {row}) unreadable "
                                         f"({err}); run `cache_tools verify` on the source") from err
                writer.append({name: [r[name] for r in rows] if name in _LISTS else np.stack([r[name] for r in rows])
                               for name in rows[0]})
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _copy_dir(src: Path, dst: Path) -> None:
    """A folder of the source cache (tokenizer, vocabulary maps), copied through a temp name unless already there."""
    if not src.is_dir() or dst.is_dir():
        return
    tmp = dst.with_name(dst.name + schema.TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(dst)


def convert_cache(source: str | Path, output: str | Path, encoding: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Convert the finished cache `source` into `output` in `encoding`; returns counts. Raises a UserError (one
    line) on a bad source, a busy or foreign output folder, or a converted cache that fails `verify`."""
    src_dir, out = Path(source).expanduser(), Path(output).expanduser()
    if encoding not in schema.ENCODINGS:
        raise BuildError(f"--encoding {encoding}: expected one of {', '.join(schema.ENCODINGS)}")
    src = schema.load_manifest(src_dir)
    if not src.complete:
        raise CacheError(f"{src_dir}: cache is incomplete; finish it with `cache_tools build-cache --resume` first")
    if src_dir.resolve() == out.resolve():
        raise BuildError(f"{out}: DST must be another folder than SRC")
    lock = output_dir.BuildLock(out)
    try:
        dst = target_manifest(src, encoding)
        plan = output_dir.plan_output(out, dst, resume=True, overwrite=overwrite)
        if plan == "done":
            _say(f"{out} is already complete; nothing to do")
            return {"num_sequences": src.num_sequences, "converted_shards": 0}
        output_dir.start_build(out, dst, plan)
        for name in (schema.TOKENIZER_DIR, schema.VOCAB_MAP_DIR):
            _copy_dir(src_dir / name, out / name)
        if not (out / schema.TOKENIZER_DIR).is_dir():
            _say(f"{src_dir} has no {schema.TOKENIZER_DIR}/ folder (an older cache); save the teacher tokenizer into "
                 f"{out / schema.TOKENIZER_DIR} (`tokenizer.save_pretrained`), which `verify` expects")
        shards, converted = [], 0
        for shard in sorted(src.shards, key=lambda s: s.first_sequence):
            done = output_dir.finished_shard(out, shard.index, dst.build_id)
            if done is None:
                done, converted = _convert_shard(src_dir, src, out, dst, shard), converted + 1
            shards.append(done)
        dst.shards, dst.num_sequences, dst.num_tokens = shards, src.num_sequences, src.num_tokens
        faults = _verify_unfinished(out, dst)
        if faults:
            raise CacheError(f"{out}: the converted cache fails verification ({faults[0]}); rerun the command to "
                             "rebuild the bad shard")
        dst.complete = True
        dst.save(out)  # written last: complete=true only once every shard is there and verified
    finally:
        lock.release()
    _say(f"{src.num_sequences} sequences, {converted} of {len(src.shards)} shards converted -> {out} ({encoding})")
    return {"num_sequences": src.num_sequences, "converted_shards": converted}


def _verify_unfinished(out: Path, dst: schema.CacheManifest) -> list[str]:
    from cache_tools.format.verify import verify_shard

    faults = [f for shard in dst.shards for f in verify_shard(out, dst, shard)]
    for shard in dst.shards if faults else ():
        if verify_shard(out, dst, shard):  # a bad shard must not survive to the rerun
            (out / shard.file).unlink(missing_ok=True)
            (out / schema.shard_sidecar_name(shard.index)).unlink(missing_ok=True)
    return faults
