"""The block-maxima top-k pre-filter (`head.row_topk`) is exact: same values as torch.topk, ids that hold them."""

from __future__ import annotations

import math

import pytest
import torch

from cache_tools import head
from cache_tools.format import schema


def _check_exact(logits: torch.Tensor, k: int) -> None:
    values, ids = head.row_topk(logits, k)
    ref_values, _ = torch.topk(logits, k, dim=-1, sorted=True)
    assert torch.equal(values, ref_values)
    assert torch.equal(logits.gather(1, ids), values)  # the ids hold exactly those values
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()  # no id twice
    assert ids.dtype == torch.int64 and (ids >= 0).all() and (ids < logits.shape[1]).all()


@pytest.mark.parametrize("vocab,k", [(151_669, 257), (151_669, 9), (4_099, 33), (50_257, 65)])
def test_prefilter_equals_torch_topk(vocab, k):
    torch.manual_seed(vocab + k)
    logits = torch.randn(7, vocab + 267)[:, :vocab] * 4  # a slice of a wider head, as the builder passes it
    block = 1 << max(3, round(math.log2(math.sqrt(vocab / k))))
    assert vocab // block >= 4 * k  # the pre-filter path runs (not the torch.topk fallback)
    _check_exact(logits, k)
    # Adversarial layouts: the whole top-k inside one block, in the tail past the last whole block, and ties.
    logits[0, :k] += 100.0
    logits[1, -(vocab % block or 1):] += 100.0
    logits[2] = torch.randint(0, 5, (vocab,)).float()  # massive ties: values still exact
    logits[3, ::2] = float("-inf")
    _check_exact(logits, k)


def test_topk_targets_with_and_without_prefilter_agree(monkeypatch):
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(32, 20_000, bias=False)
    hidden = torch.randn(30, 32) * 3
    fast = head.topk_targets(hidden, lm_head, 19_900, 20)
    monkeypatch.setattr(head, "TOPK_PREFILTER", False)
    plain = head.topk_targets(hidden, lm_head, 19_900, 20)
    for a, b in zip(fast, plain, strict=True):
        assert torch.equal(a, b)


def test_nan_logits_are_not_hidden_by_the_tail_floor():
    lm_head = torch.nn.Linear(8, 50_000, bias=False)
    hidden = torch.randn(4, 8)
    hidden[2, 0] = float("nan")
    _, logprobs, tail = head.topk_targets(hidden, lm_head, 50_000, 16)
    assert torch.isnan(logprobs[2]).all() and torch.isnan(tail[2])
    assert torch.isfinite(logprobs[[0, 1, 3]]).all() and (tail[[0, 1, 3]] >= schema.TAIL_LOGPROB_FLOOR).all()
