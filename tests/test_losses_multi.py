"""Several teachers in one fused pass: the weighted sum of single-teacher KD terms; for forward KL, KD to the
teachers' mixture up to a constant."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from loss_testing import loss_and_grads as _grads

from distill.losses import (
    IGNORE_INDEX,
    KDConfig,
    TeacherTargets,
    fused_ce_kd_loss,
    fused_multi_ce_kd_loss,
    naive_ce_kd_loss,
)

N, H, V = 37, 12, 29


def _student(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels, gen


def _full_teacher(gen, kd_mask):
    """K = V: the teacher's whole distribution is listed (no tail bucket), sorted by log-prob."""
    logprobs, ids = (torch.randn(N, V, generator=gen) * 2).log_softmax(-1).sort(dim=-1, descending=True)
    return TeacherTargets(ids, logprobs, torch.full((N,), -100.0), kd_mask)


def _topk_teacher(gen, kd_mask, k):
    full = (torch.randn(N, V, generator=gen) * 2).log_softmax(-1)
    logprobs, ids = full.topk(k, dim=-1)
    tail = torch.log1p(-logprobs.exp().sum(-1))
    return TeacherTargets(ids, logprobs, tail, kd_mask)


def _sampled_teacher(gen, kd_mask, draws):
    """Distinct ids of `draws` samples, log(count / draws), tail -inf (the sample carries all the mass)."""
    probs = (torch.randn(N, V, generator=gen) * 2).softmax(-1)
    counts = torch.zeros(N, V)
    counts.scatter_add_(1, torch.multinomial(probs, draws, replacement=True, generator=gen), torch.ones(N, draws))
    ids = torch.full((N, draws), -1, dtype=torch.long)
    logprobs = torch.zeros(N, draws)
    for row in range(N):
        seen = counts[row].nonzero().squeeze(1)
        ids[row, : len(seen)] = seen
        logprobs[row, : len(seen)] = torch.log(counts[row, seen] / draws)
    return TeacherTargets(ids, logprobs, torch.full((N,), -float("inf")), kd_mask)


def _dense(t: TeacherTargets, temperature: float, tempers: bool) -> torch.Tensor:
    """[N, V] the teacher's (tempered) distribution over the listed ids."""
    # Empty slots go to an extra column, dropped after (pointing them at column 0 would overwrite id 0).
    slots = torch.where(t.topk_ids >= 0, t.topk_ids, V)
    lp = torch.full((N, V + 1), -float("inf")).scatter(1, slots, t.topk_logprobs.float())[:, :V]
    return torch.softmax(lp / temperature if tempers else lp, -1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("second", ["full", "sampled"])
def test_forward_kl_to_two_teachers_is_kd_to_their_mixture(temperature, second):
    """Same gradient (to 1e-5) as one teacher whose targets are the exact mixture w1 p1 + w2 p2 of the (tempered)
    distributions; the loss differs by the constant sum_t w_t sum p_t log p_t - sum p_mix log p_mix."""
    hidden, weight, labels, gen = _student(0)
    kd_mask = torch.rand(N, generator=gen) > 0.2
    base = KDConfig(temperature=temperature, chunk_size=8)
    sampled_cfg = base.for_targets("sampled")
    t1 = _full_teacher(gen, kd_mask)
    t2 = _full_teacher(gen, kd_mask) if second == "full" else dataclasses.replace(
        _sampled_teacher(gen, kd_mask, 16), config=sampled_cfg)
    w = (0.6, 0.4)
    multi, mh, mw = _grads(fused_multi_ce_kd_loss, hidden, weight, labels, [t1, t2], teacher_weights=w,
                           ce_weight=0.5, kd_weight=1.5, config=base)
    p1 = _dense(t1, temperature, True)
    p2 = _dense(t2, temperature, second == "full")
    mix = w[0] * p1 + w[1] * p2
    lp_mix, ids = mix.log().sort(dim=-1, descending=True)
    mixture = TeacherTargets(ids, lp_mix, torch.full((N,), -100.0), kd_mask)
    # The mixture is already tempered: the single-teacher loss must not temper it again.
    tempered = dataclasses.replace(base, teacher_tempered=True)
    single, sh, sw = _grads(fused_multi_ce_kd_loss, hidden, weight, labels, [mixture], teacher_weights=[1.0],
                            ce_weight=0.5, kd_weight=1.5, config=tempered)
    torch.testing.assert_close(mh, sh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mw, sw, atol=1e-5, rtol=1e-5)
    xlogx = lambda p: torch.where(p > 0, p * p.clamp_min(1e-30).log(), 0.0).sum(-1)  # noqa: E731
    constant = (w[0] * xlogx(p1) + w[1] * xlogx(p2) - xlogx(mix))[kd_mask].mean() * temperature**2 * 1.5
    assert float(constant) > 1e-3  # the teachers differ: the shift is real, and the gradients above still agree
    torch.testing.assert_close(multi.loss, single.loss + constant, atol=1e-5, rtol=1e-5)


def test_weights_one_and_zero_are_the_single_teacher_loss_bit_for_bit():
    hidden, weight, labels, gen = _student(1)
    kd_mask = torch.rand(N, generator=gen) > 0.2
    t1, t2 = _topk_teacher(gen, kd_mask, 5), _topk_teacher(gen, kd_mask, 7)
    cfg = KDConfig(temperature=2.0, chunk_size=8)
    multi, mh, mw = _grads(fused_multi_ce_kd_loss, hidden, weight, labels, [t1, t2], teacher_weights=[1.0, 0.0],
                           ce_weight=0.7, kd_weight=1.3, config=cfg)
    single, sh, sw = _grads(fused_ce_kd_loss, hidden, weight, labels, t1.topk_ids, t1.topk_logprobs,
                            t1.tail_logprob, t1.kd_mask, ce_weight=0.7, kd_weight=1.3, config=cfg)
    assert torch.equal(multi.loss, single.loss) and torch.equal(mh, sh) and torch.equal(mw, sw)
    assert torch.equal(multi.teachers[0].kd, single.kd) and torch.equal(multi.ce, single.ce)
    assert torch.equal(multi.teachers[0].top1_agree, single.top1_agree)
    assert float(multi.teachers[1].kd) > 0  # the zero-weight teacher is still measured


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_multi_equals_the_weighted_sum_of_plain_single_teacher_losses(kind):
    """Different K per teacher, a teacher with fewer KD rows, own denominators; against the [N, V] reference."""
    hidden, weight, labels, gen = _student(2)
    mask1 = torch.rand(N, generator=gen) > 0.2
    mask2 = mask1 & (torch.rand(N, generator=gen) > 0.3)
    teachers = [_topk_teacher(gen, mask1, 4), _topk_teacher(gen, mask2, 9)]
    cfg = KDConfig(kind=kind, temperature=1.5, chunk_size=7)
    w = (0.25, 0.75)
    multi, mh, mw = _grads(fused_multi_ce_kd_loss, hidden, weight, labels, teachers, teacher_weights=w,
                           ce_weight=0.8, kd_weight=1.2, config=cfg, kd_denominators=[30.0, None])

    def reference(h, wt):
        ce = naive_ce_kd_loss(h, wt, labels, *_fields(teachers[0]), ce_weight=0.8, kd_weight=0.0, config=cfg)
        kd1 = naive_ce_kd_loss(h, wt, labels, *_fields(teachers[0]), ce_weight=0.0, kd_weight=1.2 * w[0],
                               config=cfg, kd_denominator=30.0)
        kd2 = naive_ce_kd_loss(h, wt, labels, *_fields(teachers[1]), ce_weight=0.0, kd_weight=1.2 * w[1], config=cfg)
        return ce.loss + kd1.loss + kd2.loss, (kd1, kd2)

    h, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_loss, parts = reference(h, wt)
    ref_loss.backward()
    torch.testing.assert_close(multi.loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mw, wt.grad, atol=1e-5, rtol=1e-5)
    for got, want in zip(multi.teachers, parts, strict=True):
        torch.testing.assert_close(got.kd, want.kd, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.top1_agree, want.top1_agree)
        torch.testing.assert_close(got.covered_mass, want.covered_mass, atol=1e-6, rtol=1e-5)
        assert got.n_kd == want.n_kd
    assert multi.teachers[1].n_kd < multi.teachers[0].n_kd
    torch.testing.assert_close(multi.kd, w[0] * multi.teachers[0].kd + w[1] * multi.teachers[1].kd)


def _fields(t: TeacherTargets):
    return t.topk_ids, t.topk_logprobs, t.tail_logprob, t.kd_mask


def test_mismatched_weights_are_refused():
    hidden, weight, labels, gen = _student(3)
    t = _topk_teacher(gen, torch.ones(N, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="2 teachers but 1 weights"):
        fused_multi_ce_kd_loss(hidden, weight, labels, [t, t], teacher_weights=[1.0])
