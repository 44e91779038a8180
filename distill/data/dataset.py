"""Datasets: teacher-cache sequences (distillation) or packed plain text (LM-only) -> per-example dicts (padded into
batches by `distill.data.collator.DistillCollator`).

Per-example dict (see docs/ARCHITECTURE.md): input_ids [n] int64, topk_ids [n, K] int64 (student ids, -1 =
empty slot), topk_logprobs [n, K] float32, tail_logprob [n] float32, kd_mask [n] bool, pooled_hidden [P, H] float32.
LM-only examples carry input_ids alone; the collator then emits no teacher keys and the model trains with CE only.

The dataset turns each `CachedSequence` into that dict through a *target builder* (any callable with that contract):
`DirectTargets` when the student shares the cache's tokenizer, `distill.data.xtok.pipeline.CrossTokenizerTargets`
otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cache_tools.format import schema
from cache_tools.format.errors import ConfigError
from cache_tools.format.reader import CachedSequence, CachedTargets, TeacherCacheReader
from distill.data.chat import loss_masks, resolve_assistant_only

# The batch keys and the collator live in collator.py; importable from here as before.
from distill.data.collator import (  # noqa: F401
    TEACHER_KEYS,
    TEACHER_PREFIX,
    XTOK_STAT_KEYS,
    XTOK_STATS,
    DistillCollator,
    teacher_key,
)
from distill.data.packing import ISOLATED, eos_segments, resolve_packing, segment_lengths_of

log = logging.getLogger(__name__)

TargetBuilder = Callable[[CachedSequence], dict[str, Any]]


class DirectTargets:
    """Target builder for a student that uses the cache's own tokenizer: ids pass through unchanged. `validate`
    (e.g. `distill.data.validation.SequenceValidator(reader)`) checks each sequence first. `isolated`: the cache
    packs documents without attention across them (examples carry `segment_lengths`); `assistant_only`: CE/KD on
    assistant content only (`distill.data.chat.loss_masks`; examples carry `label_mask`)."""

    def __init__(self, validate: Callable[[CachedSequence], None] | None = None, *, isolated: bool = False,
                 assistant_only: bool = False) -> None:
        self.validate = validate
        self.isolated = isolated
        self.assistant_only = assistant_only

    def __call__(self, seq: CachedSequence) -> dict[str, Any]:
        if self.validate is not None:
            self.validate(seq)
        label_mask, kd_mask = loss_masks(seq, self.assistant_only)
        out = {
            "input_ids": seq.input_ids.astype(np.int64),
            **self._targets(seq, kd_mask),
            "pooled_hidden": seq.pooled_hidden.astype(np.float32),
        }
        if label_mask is not None:
            out["label_mask"] = label_mask
        if self.isolated:
            out["segment_lengths"] = segment_lengths_of(seq)
        return out

    def teacher_fields(self, targets: CachedTargets) -> dict[str, Any]:
        """`TEACHER_KEYS` alone, from a window's targets read without the window (`reader.read_targets`; another
        cache over the same windows supplies the rest): the same values as `self(seq)` gives for them."""
        if self.validate is not None:
            self.validate(targets)
        return self._targets(targets, loss_masks(targets, self.assistant_only)[1])

    @staticmethod
    def _targets(seq: CachedSequence | CachedTargets, kd_mask: np.ndarray) -> dict[str, Any]:
        # The reader's arrays are this window's own, already in these dtypes: no copy
        return {"topk_ids": seq.topk_ids.astype(np.int64, copy=False),
                "topk_logprobs": seq.topk_logprobs.astype(np.float32, copy=False),
                "tail_logprob": seq.tail_logprob.astype(np.float32, copy=False), "kd_mask": kd_mask}


def check_student_compatible(reader: TeacherCacheReader, tokenizer: Any, student_vocab_rows: int) -> None:
    """Refuse (CacheError, one line) a cache whose ids the student cannot take directly (same tokenizer assumed)."""
    if reader.vocab_size > student_vocab_rows:
        raise schema.CacheError(
            f"{reader.cache_dir / schema.MANIFEST_NAME}: cache vocabulary ({reader.vocab_size} tokens) is larger than "
            f"the student's LM head ({student_vocab_rows} rows); resize the student's embeddings or use a matching "
            "student"
        )


def make_target_builder(reader: TeacherCacheReader, tokenizer: Any, student_vocab_rows: int, *,
                        xtok_rule: str = "first_token", isolated: bool = False, assistant_only: bool = False,
                        student_chat_template: str | None = None) -> TargetBuilder:
    """`DirectTargets` when the student shares the cache's tokenizer (same content hash), else the cross-tokenizer
    pipeline (re-tokenise the window text, align by consumed text, map ids through the saved vocabulary map)."""
    if schema.tokenizer_hash(tokenizer) == reader.manifest.tokenizer_hash:
        check_student_compatible(reader, tokenizer, student_vocab_rows)
        from distill.data.validation import SequenceValidator

        return DirectTargets(SequenceValidator(reader), isolated=isolated, assistant_only=assistant_only)
    from distill.data.xtok.pipeline import CrossTokenizerTargets

    return CrossTokenizerTargets(reader, None, tokenizer, rule=xtok_rule, isolated=isolated,
                                 assistant_only=assistant_only, chat_template=student_chat_template)


class CacheDataset(Dataset):
    """Map-style dataset over a subset of a cache's sequences. Picklable and fork-safe (the reader reopens its HDF5
    handles per process), so DataLoader workers are fine."""

    def __init__(self, reader: TeacherCacheReader, indices: list[int] | np.ndarray, target_builder: TargetBuilder):
        self.reader = reader
        self.indices = np.asarray(indices, dtype=np.int64)
        self.target_builder = target_builder

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        fetch = getattr(self.target_builder, "fetch", None)  # precomputed cross-tokenizer targets: no cache read
        return fetch(self.reader, index) if fetch is not None else self.target_builder(self.reader[index])


class TokenWindowDataset(Dataset):
    """LM-only: a list of token windows [n_i] int64. With `segments` (int32 [d_i] per window: the document pieces
    the packer recorded) or `isolate_after` (the EOS id: cut after each EOS) no token attends across documents."""

    def __init__(self, windows: list[np.ndarray], isolate_after: int | None = None,
                 segments: list[np.ndarray] | None = None):
        self.windows = windows
        self.isolate_after = isolate_after
        self.segments = segments

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.segments is not None:
            return {"input_ids": self.windows[i], "segment_lengths": self.segments[i]}
        if self.isolate_after is None:
            return {"input_ids": self.windows[i]}
        return {"input_ids": self.windows[i], "segment_lengths": eos_segments(self.windows[i], self.isolate_after)}


def split_eval_indices(reader: TeacherCacheReader, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split: the LAST ceil(fraction x shards) whole shards are held out (with one shard,
    the last ceil(fraction x sequences) sequences). Returns (train_indices, eval_indices)."""
    n = len(reader)
    if eval_fraction <= 0:
        return np.arange(n), np.arange(0)
    shards = reader.shards
    if len(shards) >= 2:
        held = min(len(shards) - 1, max(1, math.ceil(eval_fraction * len(shards))))
        cut = shards[len(shards) - held].first_sequence
    else:
        cut = n - min(n - 1, max(1, math.ceil(eval_fraction * n)))
    if cut <= 0:
        raise schema.CacheError(f"{reader.cache_dir}: too few sequences ({n}) to hold out --eval_fraction "
                                f"{eval_fraction}; use --eval_cache")
    held_fraction = (n - cut) / n
    if held_fraction > 1.5 * eval_fraction:  # whole shards: a small fraction of a few shards rounds up a lot
        log.warning("--eval_fraction %s: holds out %d of %d sequences (%.1f%%): the split is by whole shards; "
                    "pass --eval_cache, or build with a smaller --shard-size", eval_fraction, n - cut, n,
                    100 * held_fraction)
    return np.arange(cut), np.arange(cut, n)


@dataclass
class BuiltData:
    train: Dataset
    eval: Dataset | None
    reader: TeacherCacheReader | None  # the training cache (None in LM-only mode)
    eval_reader: TeacherCacheReader | None = None  # a separate --eval_cache, if any

    @property
    def readers(self) -> list[TeacherCacheReader]:
        """Every cache this run reads (training, then a separate eval cache)."""
        return [r for r in (self.reader, self.eval_reader) if r is not None]


def build_cache_data(
    cache_dir: str | Path,
    tokenizer: Any,
    student_vocab_rows: int,
    *,
    eval_cache: str | Path | None = None,
    eval_fraction: float = 0.0,
    max_eval_sequences: int | None = None,
    target_builder: TargetBuilder | None = None,
    xtok_rule: str = "first_token",
    packing: str | None = None,
    assistant_only_loss: bool | None = None,
    student_chat_template: str | None = None,
) -> BuiltData:
    """Open the training cache (and the eval cache), check the student can use them, split, wrap as datasets.
    `target_builder` defaults to `make_target_builder` per cache (direct or cross-tokenizer). The student follows
    the caches' packing (`packing`, --packing, may only repeat it) and, on conversational caches, trains on assistant
    content only unless `assistant_only_loss` is False (`distill.data.chat`)."""
    # Our own target builders validate every sequence (`distill.data.validation`: ids, finite and <= 0 log-probs,
    # pooled states), a superset of the reader's finite check: read once, check once on the loader's hot path.
    # Every shard's sha256 is checked before its first read (remembered by size + mtime): no damaged byte is trained on.
    reader = TeacherCacheReader(cache_dir, check_finite=target_builder is not None, verify_shards=True)
    eval_reader = (TeacherCacheReader(eval_cache, check_finite=target_builder is not None, verify_shards=True)
                   if eval_cache else reader)
    caches = [(str(r.cache_dir), r.manifest) for r in dict.fromkeys((reader, eval_reader))]
    options = {"xtok_rule": xtok_rule, "isolated": resolve_packing(packing, caches) == ISOLATED,
               "assistant_only": resolve_assistant_only(assistant_only_loss, caches),
               "student_chat_template": student_chat_template}
    train_builder = target_builder or make_target_builder(reader, tokenizer, student_vocab_rows, **options)
    train_idx, eval_idx = split_eval_indices(reader, eval_fraction)
    eval_builder = train_builder
    if eval_cache:
        # The eval cache may come from another teacher tokenizer: it gets its own builder.
        eval_builder = target_builder or make_target_builder(eval_reader, tokenizer, student_vocab_rows, **options)
        eval_idx = np.arange(len(eval_reader))
    if max_eval_sequences is not None:
        eval_idx = eval_idx[:max_eval_sequences]
    eval_ds = CacheDataset(eval_reader, eval_idx, eval_builder) if len(eval_idx) else None
    return BuiltData(CacheDataset(reader, train_idx, train_builder), eval_ds, reader,
                     eval_reader if eval_reader is not reader else None)


def build_text_data(spec: str, tokenizer: Any, *, max_length: int, text_column: str = "text",
                    max_samples: int | None = None, packing: str = "cross_document") -> BuiltData:
    """LM-only mode: load documents, pack them into windows of `max_length` tokens (EOS between documents). With
    `packing` "isolated" no token attends to another document (each EOS closes its document)."""
    from cache_tools.format.text_data import load_documents, pack_windows

    # text_data raises its own one-line UserErrors (DatasetInputError, TokenizerError) naming the spec and the fix.
    docs = load_documents(spec, text_column=text_column, max_samples=max_samples)
    packed = [w for w in pack_windows(tokenizer, docs, max_length) if len(w.input_ids) >= 2]  # 1 token: no label
    if not packed:
        raise ConfigError(f"--dataset {spec}: no text windows of >= 2 tokens; check --text_column {text_column}")
    windows = [w.input_ids.astype(np.int64) for w in packed]
    if packing != ISOLATED:
        return BuiltData(TokenWindowDataset(windows), None, None)
    pieces = [getattr(w, "segment_lengths", None) for w in packed]
    if all(p is not None and len(p) and int(np.sum(p)) == len(ids) for p, ids in zip(pieces, windows, strict=True)):
        return BuiltData(TokenWindowDataset(windows, segments=pieces), None, None)
    return BuiltData(TokenWindowDataset(windows, tokenizer.eos_token_id), None, None)
