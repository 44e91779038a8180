"""The collator: per-example dicts (`distill.data.dataset`) -> padded batches, and the batch's key names.

Teacher 0's targets use the plain keys (`TEACHER_KEYS`); teacher t >= 1 (several caches, `distill.data.multi`) the
same keys prefixed `t{t}.` (`teacher_key`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.data.packing import positions_and_segments
from distill.losses import IGNORE_INDEX

TEACHER_KEYS = ("topk_ids", "topk_logprobs", "tail_logprob", "kd_mask")
TEACHER_PREFIX = "t{index}."  # keys of teacher index >= 1 (several caches): "t1.topk_ids", ...
XTOK_STATS = "xtok_stats"  # collator key: [1, 4] float64 sums of XTOK_STAT_KEYS (cross-tokenizer batches only)
XTOK_STAT_KEYS = ("student_tokens", "aligned", "teacher_mass", "mapped_mass")


def teacher_key(index: int, key: str) -> str:
    """The example/batch key of teacher `index`'s field `key` (teacher 0 keeps the plain single-teacher key)."""
    return key if index == 0 else TEACHER_PREFIX.format(index=index) + key


class DistillCollator:
    """Pads a list of per-example dicts to the batch's max length.

    Output (B = batch, L = max n, K = top_k, P/H = pooled layers / teacher hidden):
        input_ids [B, L] int64 (pad_token_id on padding), attention_mask [B, L] int64,
        labels [B, L] int64: labels[t] = input_ids[t+1], IGNORE_INDEX at each sequence's last position and padding
        (and where an example's `label_mask` is False, and at the last position of each packed document);
    when the examples carry `segment_lengths` (isolated packing, `distill.data.packing`):
        position_ids [B, L] int64 (0.. within each document, 0 on padding), segment_ids [B, L] int64 (-1 on padding);
    and, when the examples carry teacher targets:
        topk_ids [B, L, K] int64 (-1 on padding), topk_logprobs [B, L, K] float32, tail_logprob [B, L] float32,
        kd_mask [B, L] bool (False on padding), pooled_hidden [B, P, H] float32.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        B, L = len(examples), max(lengths)
        input_ids = np.full((B, L), self.pad_token_id, dtype=np.int64)
        labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((B, L), dtype=np.int64)
        for b, (e, n) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[b, :n] = e["input_ids"]
            labels[b, : n - 1] = e["input_ids"][1:]
            attention[b, :n] = 1
            if "label_mask" in e:
                labels[b, :n][~e["label_mask"]] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if any("segment_lengths" in e for e in examples):
            positions = np.zeros((B, L), dtype=np.int64)
            segments = np.full((B, L), -1, dtype=np.int64)
            for b, (e, n) in enumerate(zip(examples, lengths, strict=True)):
                pieces = e.get("segment_lengths", np.array([n] if n else [], dtype=np.int32))
                positions[b, :n], segments[b, :n] = positions_and_segments(pieces, n)
                labels[b, np.cumsum(pieces) - 1] = IGNORE_INDEX  # it would predict the next, unrelated document
            batch.update(position_ids=positions, segment_ids=segments)
        if "topk_ids" in examples[0]:
            t = 0
            while teacher_key(t, "topk_ids") in examples[0]:  # several teachers: `distill.data.multi`
                batch.update(_pad_teacher(examples, lengths, L, teacher_key(t, "")))
                t += 1
            batch["pooled_hidden"] = np.stack([e["pooled_hidden"] for e in examples]).astype(np.float32)
        if "stats" in examples[0]:
            # Cross-tokenizer coverage of this batch, summed: [student tokens, aligned, teacher mass, mapped mass].
            batch[XTOK_STATS] = np.array([[sum(float(e["stats"][k]) for e in examples) for k in XTOK_STAT_KEYS]],
                                         dtype=np.float64)
        return {k: torch.from_numpy(v) for k, v in batch.items()}


def _pad_teacher(examples: list[dict[str, Any]], lengths: list[int], L: int, prefix: str) -> dict[str, np.ndarray]:
    """One teacher's targets (keys `prefix` + TEACHER_KEYS) padded to [B, L(, K)]: -1 ids and no KD on padding."""
    keys = [prefix + key for key in TEACHER_KEYS]
    if all(n == L for n in lengths):  # every window full (packed caches): nothing to pad, one copy instead of two
        dtypes = (np.int64, np.float32, np.float32, np.bool_)
        return {key: np.stack([e[key] for e in examples]).astype(dtype, copy=False)
                for key, dtype in zip(keys, dtypes, strict=True)}
    B, K = len(examples), examples[0][prefix + "topk_ids"].shape[1]
    topk_ids = np.full((B, L, K), -1, dtype=np.int64)
    topk_logprobs = np.zeros((B, L, K), dtype=np.float32)
    tail = np.zeros((B, L), dtype=np.float32)
    kd_mask = np.zeros((B, L), dtype=np.bool_)
    for b, (e, n) in enumerate(zip(examples, lengths, strict=True)):
        topk_ids[b, :n] = e[prefix + "topk_ids"]
        topk_logprobs[b, :n] = e[prefix + "topk_logprobs"]
        tail[b, :n] = e[prefix + "tail_logprob"]
        kd_mask[b, :n] = e[prefix + "kd_mask"]
    return {prefix + "topk_ids": topk_ids, prefix + "topk_logprobs": topk_logprobs, prefix + "tail_logprob": tail,
            prefix + "kd_mask": kd_mask}
