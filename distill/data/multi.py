"""Several teachers' caches over the same windows: one example per window carrying every teacher's targets.

Teacher 0 (the first --cache) keeps the single-teacher keys (`TEACHER_KEYS`, plus `pooled_hidden` for the auxiliary
losses); teacher t >= 1 adds the same keys prefixed `t{t}.` (`teacher_key`). The caches must cover the same windows
(`cache_tools.format.windows.check_same_windows`: same text, teacher tokenizer, max_length, packing, shard layout),
checked before any training; each cache keeps its own target builder, so a student with another tokenizer goes
through each cache's own cross-tokenizer path (and its precomputed store, `CACHE/xtok/`). Teachers with different
tokenizers from each other are refused by that check: their windows cut the text at other places, so a window of one
has no counterpart in the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cache_tools.format.errors import CacheMismatchError
from cache_tools.format.windows import check_same_windows
from distill.data.dataset import TEACHER_KEYS, BuiltData, CacheDataset, DirectTargets, build_cache_data, teacher_key


def num_teachers(batch: dict[str, Any]) -> int:
    """Teachers whose targets an example or batch carries (0 in LM-only batches)."""
    if "topk_ids" not in batch:
        return 0
    count = 1
    while teacher_key(count, "topk_ids") in batch:
        count += 1
    return count


class MultiCacheDataset(Dataset):
    """Zips one `CacheDataset` per teacher (same indices, same windows): teacher 0's example plus every other
    teacher's `TEACHER_KEYS` under `teacher_key`.

    On the direct path teachers t >= 1 read only their targets and masks (`reader.read_targets`): the windows are
    teacher 0's, proven the same by the windows check, and every dataset read costs an HDF5 call whatever its size.
    The cross-tokenizer path reads each cache whole (its builder aligns from the window's text and offsets) and
    refuses (CacheMismatchError) a window whose student ids differ; the direct path refuses one whose length
    differs. The window check makes both impossible unless a cache changed under the run."""

    def __init__(self, datasets: Sequence[CacheDataset]):
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.datasets[0][i]
        n = len(example["input_ids"])
        for t, dataset in enumerate(self.datasets[1:], start=1):
            builder = dataset.target_builder
            if isinstance(builder, DirectTargets):
                other = builder.teacher_fields(dataset.reader.read_targets(int(dataset.indices[i])))
                same = len(other["kd_mask"]) == n
            else:
                other = dataset[i]
                same = np.array_equal(other["input_ids"], example["input_ids"])
            if not same:
                raise CacheMismatchError(
                    f"{self.datasets[0].reader.cache_dir} and {dataset.reader.cache_dir}: sequence "
                    f"{int(dataset.indices[i])} holds other tokens; run `cache_tools verify` on both caches")
            example.update({teacher_key(t, key): other[key] for key in TEACHER_KEYS})
        return example


@dataclass
class MultiBuiltData(BuiltData):
    """`BuiltData` of teacher 0 (its readers drive the aux settings) plus every teacher's own."""

    teachers: list[BuiltData] | None = None

    @property
    def teacher_readers(self) -> list[list[Any]]:
        """Per teacher, every cache it reads (training, then a separate eval cache)."""
        return [t.readers for t in self.teachers or [self]]


def build_multi_cache_data(caches: Sequence[str | Path], tokenizer: Any, student_vocab_rows: int, *,
                           eval_caches: Sequence[str | Path] = (), **options: Any) -> MultiBuiltData:
    """One `build_cache_data` per teacher (`options` as there), after checking that the training caches (and the
    eval caches) cover the same windows; `eval_caches`: none or one per teacher."""
    if eval_caches and len(eval_caches) != len(caches):
        raise CacheMismatchError(f"{len(caches)} --cache but {len(eval_caches)} --eval_cache; give one eval cache per "
                                 "teacher (the same order) or none")
    per_teacher = [build_cache_data(c, tokenizer, student_vocab_rows, eval_cache=eval_caches[i] if eval_caches
                                    else None, **options) for i, c in enumerate(caches)]
    check_same_windows([(d.reader.cache_dir, d.reader.manifest) for d in per_teacher], "--cache")
    if eval_caches:
        check_same_windows([(d.eval_reader.cache_dir, d.eval_reader.manifest) for d in per_teacher],
                           "--eval_cache")
    first = per_teacher[0]
    train = MultiCacheDataset([d.train for d in per_teacher]) if len(per_teacher) > 1 else first.train
    evals = [d.eval for d in per_teacher]
    eval_ds = MultiCacheDataset(evals) if len(per_teacher) > 1 and evals[0] is not None else first.eval
    return MultiBuiltData(train, eval_ds, first.reader, first.eval_reader, teachers=per_teacher)
