"""`verify_cache`: check a finished cache end to end (manifest, checksums, layout from `schema.DATASETS`, and the
numbers themselves: every sequence is decoded as the reader would, then checked in blocks)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache_tools.format import conversations, encodings, schema, shard_io
from cache_tools.format.windows import compute_shard_digest

_ROWS_PER_READ = 64  # sequences checked at a time, so memory stays bounded on big shards


def _layout_faults(f: h5py.File, m: schema.CacheManifest, shard: schema.ShardInfo) -> list[str]:
    """Every dataset of the table present with its shape and dtype; attributes agree with the manifest."""
    faults = []
    for spec in schema.datasets_for(m):
        if spec.name not in f:
            return [f"{shard.file}: dataset {spec.name} missing"]
        ds, shape, dtype = f[spec.name], (shard.num_sequences, *spec.shape(m)), spec.dtype(m)
        if ds.shape != shape:
            faults.append(f"{shard.file}: {spec.name} has shape {ds.shape}, expected {shape}")
        if not spec.is_vlen(m) and ds.dtype != dtype:
            faults.append(f"{shard.file}: {spec.name} has dtype {ds.dtype}, expected {dtype}")
    if int(f.attrs.get(schema.ATTR_FIRST_SEQUENCE, -1)) != shard.first_sequence:
        faults.append(f"{shard.file}: first_sequence attribute disagrees with the manifest")
    if int(f.attrs.get(schema.ATTR_FORMAT_VERSION, -1)) != m.format_version:
        faults.append(f"{shard.file}: format_version attribute disagrees with the manifest")
    return faults


def _topk_fault(m: schema.CacheManifest, t: encodings.Targets) -> str | None:
    lp, tail = t.logprobs, t.tail
    if not np.isfinite(lp).all() or not np.isfinite(tail).all():
        return "non-finite log-probs"
    if (lp > 0).any() or (tail > 0).any():
        return "log-probs > 0"
    if (tail < schema.TAIL_LOGPROB_FLOOR).any():
        return f"tail_logprob below the floor {schema.TAIL_LOGPROB_FLOOR}"
    if (np.diff(lp, axis=-1) > 0).any():
        return "top-k log-probs not sorted in descending order"
    total = np.exp(lp.astype(np.float64)).sum(-1) + np.exp(tail.astype(np.float64))
    if (np.abs(total - 1.0) > schema.PROB_SUM_EPS).any():
        worst = float(total[np.argmax(np.abs(total - 1.0))])
        return f"probabilities sum to {worst:.4f}, not 1 (+-{schema.PROB_SUM_EPS})"
    return None


def _sampled_fault(m: schema.CacheManifest, t: encodings.Targets) -> str | None:
    N = m.targets.num_samples
    sums = t.counts.sum(-1)
    if (sums != N).any():
        return f"sample counts sum to {int(sums[np.argmax(sums != N)])}, not num_samples {N}"
    if ((t.counts > 0) != (t.ids >= 0)).any():
        return "sample ids and counts disagree on which slots are used"
    return None


def _target_ids_fault(t: encodings.Targets, vocab_size: int) -> str | None:
    used = t.ids >= 0
    if (t.ids >= vocab_size).any():
        return f"target ids >= vocab_size {vocab_size}"
    if t.ids.shape[-1] > 1:
        ordered = np.sort(np.where(used, t.ids, -1 - np.arange(t.ids.shape[-1])), axis=-1)  # padding never repeats
        if (np.diff(ordered, axis=-1) == 0).any():
            return "duplicate ids within a position's targets"
    return None


@dataclass
class _Block:
    """Rows [lo, hi) of one shard as the reader sees them: raw per-sequence datasets, decoded targets (all positions
    of the block concatenated) and each sequence's decoded offsets [n, 2]."""

    lo: int
    raw: list[dict[str, Any]]
    targets: encodings.Targets
    offsets: list[np.ndarray]


def _read_block(f: h5py.File, lo: int, hi: int, m: schema.CacheManifest, first: int) -> _Block | str:
    raw, decoded, offsets = [], [], []
    for row in range(lo, hi):
        sequence = first + row  # the manifest's global index: format 3 blobs are bound to it
        n = int(f[schema.VALID_LENGTH][row])
        if not 1 <= n <= m.max_length:  # checked first: every per-token read and decode is cut at n
            return f"valid_length outside 1..{m.max_length}"
        what = "input ids / text"  # what is being decoded, for the fault line
        try:
            values = encodings.with_window(m, shard_io.read_row(f, m, row), n, sequence)
            what = "targets"
            decoded.append(encodings.decode_targets(m, values, n, sequence, expand=False))  # stored positions only
        except UnicodeDecodeError:
            return f"row {row}: text is not valid UTF-8"
        except (ValueError, KeyError, IndexError) as err:  # codec.CodecError is a ValueError
            return f"row {row} (sequence {sequence}): {what} not decodable ({err})"
        try:
            offsets.append(encodings.decode_offsets(m, values, n, sequence))
        except (ValueError, KeyError) as err:
            return f"row {row} (sequence {sequence}): token offsets not decodable ({err})"
        raw.append(values)
    counts = None if decoded[0].counts is None else np.concatenate([t.counts for t in decoded])
    joined = [np.concatenate([getattr(t, name) for t in decoded]) for name in ("ids", "logprobs", "tail")]
    return _Block(lo, raw, encodings.Targets(*joined, counts=counts), offsets)


def _offsets_fault(b: _Block) -> str | None:
    """Every token's (start, end) must satisfy 0 <= start <= end <= len(text) of its window (characters)."""
    for row, (values, offsets) in enumerate(zip(b.raw, b.offsets, strict=True), start=b.lo):
        start, end, chars = offsets[:, 0], offsets[:, 1], len(values[schema.TEXT])
        wrong = (start < 0) | (end < start) | (end > chars)
        if wrong.any():
            bad = int(np.argmax(wrong))
            return (f"row {row}: token {bad} has offsets ({int(start[bad])}, {int(end[bad])}), not within "
                    f"0 <= start <= end <= {chars} (the window's text length)")
    return None


def _column(block: _Block, name: str) -> np.ndarray:
    return np.concatenate([np.atleast_1d(values[name]) for values in block.raw])


def _segments_fault(b: _Block) -> str | None:
    for row, values in enumerate(b.raw, start=b.lo):
        lengths = np.asarray(values[schema.SEGMENT_LENGTHS])
        n = int(values[schema.VALID_LENGTH])
        if lengths.size == 0 or (lengths < 1).any() or int(lengths.sum()) != n:
            return f"row {row}: segment_lengths {lengths.tolist()[:8]} do not split its {n} tokens into pieces >= 1"
    return None


def _masks_fault(m: schema.CacheManifest, b: _Block) -> str | None:
    """Mask values are 0/1 and agree with each other: a position stores targets exactly when the next token of the
    same piece is assistant content (the window's last position may look into the next window, so it is free)."""
    for row, values in enumerate(b.raw, start=b.lo):
        n = int(values[schema.VALID_LENGTH])
        for name in (schema.ASSISTANT_MASK, schema.TARGET_MASK):
            if name in values and (np.asarray(values[name][:n]) > 1).any():
                return f"row {row}: {name} holds values other than 0/1"
        if not m.targets.assistant_only or schema.ASSISTANT_MASK not in values:
            continue
        assistant = np.asarray(values[schema.ASSISTANT_MASK][:n]).astype(bool)
        stored = np.asarray(values[schema.TARGET_MASK][:n]).astype(bool)
        expected = np.zeros(n, dtype=bool)
        expected[:-1] = assistant[1:]
        expected[np.cumsum(values[schema.SEGMENT_LENGTHS])[:-1] - 1] = False  # a piece's last token
        wrong = (stored != expected)[:-1]
        if wrong.any():
            t = int(np.argmax(wrong))
            return (f"row {row}: target_mask[{t}] = {int(stored[t])} but token {t + 1} is "
                    f"{'' if assistant[t + 1] else 'not '}assistant content (assistant_mask and target_mask disagree)")
    return None


def _conversation_fault(b: _Block) -> str | None:
    for row, values in enumerate(b.raw, start=b.lo):
        try:
            pieces = json.loads(encodings.decode_text(values[schema.CONVERSATION]))
            text = values[schema.TEXT]
            for piece in pieces:
                for msg, field, start, end, offset in piece["spans"]:
                    source = conversations.field_text(piece["messages"][msg], field)
                    if text[start:end] != source[offset : offset + end - start]:
                        return f"row {row}: conversation span ({msg}, {field}, {start}, {end}) is not that content"
        except (ValueError, KeyError, TypeError, IndexError) as err:
            return f"row {row}: conversation record unreadable ({type(err).__name__}: {err})"
    return None


# What each check name of `schema.DATASETS` means: (manifest, block) -> first fault or None.
CHECKS: dict[str, Callable[[schema.CacheManifest, _Block], str | None]] = {
    "length_range": lambda m, b: None,  # checked while reading the block: decoding needs a sane length
    "ids_below_vocab": lambda m, b: None if (_column(b, schema.INPUT_IDS) < m.vocab_size).all()
    else f"input ids >= vocab_size {m.vocab_size}",
    "utf8": lambda m, b: None,  # decoding the text while reading the block is the check
    "topk_targets": lambda m, b: _target_ids_fault(b.targets, m.vocab_size) or _topk_fault(m, b.targets),
    "sampled_targets": lambda m, b: _target_ids_fault(b.targets, m.vocab_size) or _sampled_fault(m, b.targets),
    "pooled_finite": lambda m, b: None if np.isfinite(_column(b, schema.POOLED_HIDDEN).astype(np.float32)).all()
    else "non-finite pooled_hidden",
    "token_count": lambda m, b: None,  # checked per shard against the manifest, see verify_shard
    "offsets_in_text": lambda m, b: _offsets_fault(b),  # decoding (compact) was checked while reading the block
    "segments": lambda m, b: _segments_fault(b),
    "masks": _masks_fault,
    "conversation": lambda m, b: _conversation_fault(b),
}


def _check_rows(f: h5py.File, lo: int, hi: int, m: schema.CacheManifest, first: int) -> str | None:
    """Content checks on rows [lo, hi) of one shard (whose row 0 is global sequence `first`), as the table declares
    them; returns the first fault or None."""
    block = _read_block(f, lo, hi, m, first)
    if isinstance(block, str):
        return block
    names = dict.fromkeys(check for spec in schema.datasets_for(m) for check in spec.checks)
    # Masks and segments first: a damaged target_mask also misplaces the targets it selects; name the cause.
    names = {**{k: None for k in ("segments", "masks") if k in names}, **names}
    for name in names:
        fault = CHECKS[name](m, block)
        if fault:
            return fault
    return None


def verify_shard(cache_dir: Path, m: schema.CacheManifest, shard: schema.ShardInfo) -> list[str]:
    path = cache_dir / shard.file
    if not path.is_file():
        return [f"{shard.file}: missing"]
    size = path.stat().st_size
    if size != shard.bytes:
        return [f"{shard.file}: {size} bytes, manifest says {shard.bytes} (truncated or replaced); "
                "delete it and run build-cache --resume"]
    if schema.file_sha256(path) != shard.sha256:
        return [f"{shard.file}: sha256 mismatch (corrupted on disk); delete it and run build-cache --resume"]
    faults = []
    try:
        with shard_io.open_shard(path) as f:
            faults = _layout_faults(f, m, shard)
            if faults:
                return faults
            if int(f[schema.VALID_LENGTH][:].sum()) != shard.num_tokens:
                faults.append(f"{shard.file}: token count disagrees with the manifest")
            for lo in range(0, shard.num_sequences, _ROWS_PER_READ):
                hi = min(shard.num_sequences, lo + _ROWS_PER_READ)
                fault = _check_rows(f, lo, hi, m, shard.first_sequence)
                if fault:
                    first = shard.first_sequence
                    faults.append(f"{shard.file}: sequences {first + lo}..{first + hi - 1}: {fault}")
                    break
            # After the rows: a damaged row is named as such, not only as a digest that disagrees.
            if not faults and shard.windows_digest and compute_shard_digest(path) != shard.windows_digest:
                faults.append(f"{shard.file}: windows digest disagrees with the manifest")
    except (OSError, schema.CacheError) as err:
        return [f"{shard.file}: unreadable HDF5 ({err})"]
    return faults


def _tokenizer_faults(cache_dir: Path, m: schema.CacheManifest) -> list[str]:
    """`build-cache` saves the teacher tokenizer with every cache it names a build id for (cross-tokenizer students
    and `inspect` read it from there); a cache without a build id (hand-made, older) may lack it."""
    folder = cache_dir / schema.TOKENIZER_DIR
    if not m.build_id or (folder / "tokenizer_config.json").is_file():
        return []
    state = "holds no tokenizer_config.json" if folder.is_dir() else "missing"
    return [f"{schema.TOKENIZER_DIR}/: {state} (the teacher tokenizer saved with the cache); run build-cache --resume "
            "with the build's command to restore it"]


def verify_cache(cache_dir: str | Path) -> list[str]:
    """All faults found (empty list = sound). Each fault is one line naming the file."""
    cache_dir = Path(cache_dir)
    try:
        m = schema.load_manifest(cache_dir)
    except schema.CacheError as err:
        return [str(err)]
    faults = []
    if not m.complete:
        faults.append(f"{schema.MANIFEST_NAME}: cache is incomplete; finish it with `cache_tools build-cache --resume`")
    expected_first = 0
    for shard in sorted(m.shards, key=lambda s: s.first_sequence):
        if shard.first_sequence != expected_first:
            faults.append(f"{shard.file}: starts at sequence {shard.first_sequence}, expected {expected_first}; rerun "
                      "build-cache --resume to rebuild the manifest")
        expected_first = shard.first_sequence + shard.num_sequences
        # Every line names its fix; a shard's fault is repaired by rebuilding that shard.
        faults.extend(f if ";" in f else f"{f}; run build-cache --resume to rebuild it"
                      for f in verify_shard(cache_dir, m, shard))
    listed = {s.file for s in m.shards}
    for extra in sorted(p.name for p in cache_dir.glob(f"{schema.SHARD_PREFIX}*.h5") if p.name not in listed):
        faults.append(f"{extra}: not listed in the manifest (a shard an interrupted build finished, or one left by "
                      "another build); run build-cache --resume, which keeps it when its checksum and settings match "
                      "(else rebuilds it)")
    faults.extend(_tokenizer_faults(cache_dir, m))
    if expected_first != m.num_sequences:
        faults.append(f"{schema.MANIFEST_NAME}: shards hold {expected_first} sequences, manifest says "
                      f"{m.num_sequences}; rerun build-cache --resume to rebuild the manifest")
    return faults


def format_notes(cache_dir: str | Path) -> list[str]:
    """What a readable cache of an older format lacks against the current one (one line each; empty when current)."""
    m = schema.load_manifest(cache_dir)
    notes = []
    if m.format_version < 3 and m.targets.encoding == "compact":
        notes.append(f"format {m.format_version} compact blobs are not bound to their rows (a blob moved to another "
                     "row is not detected) and decode slower than format 3; `cache_tools convert SRC DST "
                     "--encoding compact` rewrites them")
    if m.format_version >= 3 and m.targets.encoding == "compact" and not schema.compact_windows(m):
        notes.append("input ids and text are plain arrays, not window blobs; `cache_tools convert SRC DST --encoding "
                     "compact` rewrites them smaller")
    if m.format_version < 3:
        notes.append(f"format {m.format_version} windows record no document pieces (read as one segment each, "
                     "packed cross-document: the teacher attended across documents) and no conversation masks; "
                     "rebuild with build-cache for isolated packing or conversations")
    undigested = sum(not shard.windows_digest for shard in m.shards)
    if undigested:
        notes.append(f"{undigested} of {len(m.shards)} shards record no windows digest: training from several caches "
                     "(--cache A --cache B) computes it by reading every window's ids and text before it starts; "
                     f"`cache_tools convert SRC DST --encoding {m.targets.encoding}` or a rebuild records it")
    return notes
