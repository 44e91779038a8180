"""Assistant-only loss on the student side (`--assistant_only_loss`): which positions get CE and KD, on the direct
and cross-tokenizer paths, and the refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cache_tools.format.errors import ConfigError
from distill.data.chat import loss_masks, resolve_assistant_only, unstored_targets
from distill.data.dataset import DirectTargets, DistillCollator
from distill.losses import IGNORE_INDEX


def _chat_seq(assistant: list[int], target: list[int] | None = None):
    n = len(assistant)
    return SimpleNamespace(
        index=0, input_ids=np.arange(10, 10 + n, dtype=np.int64), offsets=np.zeros((n, 2), np.int32),
        topk_ids=np.tile(np.arange(3, dtype=np.int64), (n, 1)), topk_logprobs=np.full((n, 3), -1.5, np.float32),
        tail_logprob=np.full(n, -1.5, np.float32), pooled_hidden=np.zeros((1, 2), np.float16), text="",
        doc_index=0, segment_lengths=None, assistant_mask=np.array(assistant, bool),
        target_mask=None if target is None else np.array(target, bool), length=n)


def test_masks_follow_the_predicted_token():
    #          prompt   | assistant + end of turn | prompt | assistant
    seq = _chat_seq([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], target=[0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
    label, kd = loss_masks(seq, assistant_only=True)
    # position t trains when token t + 1 is assistant content; the last position predicts the next window
    assert label.astype(int).tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]
    assert kd.astype(int).tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1, 0]
    label, kd = loss_masks(seq, assistant_only=False)
    assert label is None and kd.astype(int).tolist() == seq.target_mask.astype(int).tolist()
    partial = _chat_seq([0, 1, 1, 1], target=[1, 0, 1, 1])
    assert unstored_targets(partial) == (3, 1)  # position 1 predicts assistant content but has no stored target


def test_collator_ignores_labels_outside_assistant_content():
    seq = _chat_seq([0, 0, 1, 1, 0, 1])
    ex = DirectTargets(assistant_only=True)(seq)
    batch = DistillCollator(pad_token_id=0)([ex])
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, 15, IGNORE_INDEX]
    assert batch["kd_mask"][0].tolist() == [False, True, True, False, True, False]
    everything = DistillCollator(pad_token_id=0)([DirectTargets(assistant_only=False)(seq)])
    assert everything["labels"][0].tolist() == [11, 12, 13, 14, 15, IGNORE_INDEX]
    assert everything["kd_mask"][0].all()


def test_default_is_true_on_conversational_caches_and_plain_caches_refuse_it():
    chat = SimpleNamespace(dataset=SimpleNamespace(row_format="messages"))
    plain = SimpleNamespace(dataset=SimpleNamespace())
    assert resolve_assistant_only(None, [("c", chat)]) is True
    assert resolve_assistant_only(False, [("c", chat)]) is False
    assert resolve_assistant_only(None, [("p", plain)]) is False
    with pytest.raises(ConfigError, match="--assistant_only_loss true: p is a plain-text cache"):
        resolve_assistant_only(True, [("p", plain)])
