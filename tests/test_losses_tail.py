"""Tail-bucket KD math on hand-made distributions (expected values worked out by hand), and zero KD for a student
that equals its teacher."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import IGNORE_INDEX, KDConfig, fused_ce_kd_loss, naive_ce_kd_loss

LOSSES = (fused_ce_kd_loss, naive_ce_kd_loss)
# Student probabilities over V = 4 tokens, made exact by using log-probs as logits with an identity LM head.
Q = [0.5, 0.2, 0.2, 0.1]


def _hand_batch():
    """Row A: support {0, 2} (an empty slot between), teacher 0.6 / 0.2, tail 0.2. Row B: support {3, 1}, teacher
    0.5 / 0.3, tail 0.2. Student tails: A = 0.2 + 0.1 = 0.3, B = 0.5 + 0.2 = 0.7."""
    hidden = torch.tensor([Q, Q]).log()
    weight = torch.eye(4)
    ids = torch.tensor([[0, -1, 2], [3, 1, -1]])
    logprobs = torch.tensor([[0.6, 9.0, 0.2], [0.5, 0.3, 9.0]]).log()
    tail = torch.tensor([0.2, 0.2]).log()
    labels = torch.tensor([1, IGNORE_INDEX])
    return hidden, weight, labels, ids, logprobs, tail, torch.tensor([True, True])


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _temper(p, t):
    z = sum(x ** (1 / t) for x in p)
    return [x ** (1 / t) / z for x in p]


P_A, Q_A = [0.6, 0.2, 0.2], [0.5, 0.2, 0.3]
P_B, Q_B = [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]


def _jsd(p, q, beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _renorm(p):
    return [x / sum(p[:-1]) for x in p[:-1]]


def _mean_over_rows(divergence) -> float:
    return (divergence(P_A, Q_A) + divergence(P_B, Q_B)) / 2


EXPECTED = {
    ("forward_kl", 1.0, True): _mean_over_rows(_kl),
    ("reverse_kl", 1.0, True): _mean_over_rows(lambda p, q: _kl(q, p)),
    ("jsd", 1.0, True): _mean_over_rows(lambda p, q: _jsd(p, q, 0.3)),
    ("forward_kl", 1.0, False): _mean_over_rows(lambda p, q: _kl(_renorm(p), _renorm(q))),
    # T = 2: each bucket (the tail as one) is tempered p^(1/T), renormalised, and KD is multiplied by T^2.
    ("forward_kl", 2.0, True): 4 * _mean_over_rows(lambda p, q: _kl(_temper(p, 2), _temper(q, 2))),
    ("reverse_kl", 2.0, False): 4 * _mean_over_rows(lambda p, q: _kl(_temper(_renorm(q), 2), _temper(_renorm(p), 2))),
}


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize(("kind", "temperature", "use_tail"), list(EXPECTED))
def test_hand_made_tail_bucket_values(fn, kind, temperature, use_tail):
    cfg = KDConfig(kind=kind, temperature=temperature, use_tail=use_tail, jsd_beta=0.3, chunk_size=1)
    out = fn(*_hand_batch(), config=cfg)
    assert out.kd.item() == pytest.approx(EXPECTED[(kind, temperature, use_tail)], rel=1e-5)
    assert out.ce.item() == pytest.approx(-math.log(0.2), rel=1e-6)
    assert out.top1_agree.item() == pytest.approx(0.5)  # A: both pick token 0; B: teacher 3, student 0
    assert out.covered_mass.item() == pytest.approx((0.7 + 0.3) / 2, rel=1e-6)
    assert (out.n_ce, out.n_kd) == (1, 2)


@pytest.mark.parametrize("fn", LOSSES)
def test_hand_made_forward_kl_gradient(fn):
    """d KL / d z: q_j - p_j on the support; q_j * (1 - p_tail / q_tail) on a tail token."""
    hidden, weight, labels, ids, logprobs, tail, kd_mask = _hand_batch()
    hidden = hidden[:1].clone().requires_grad_(True)
    out = fn(hidden, weight, labels[:1], ids[:1], logprobs[:1], tail[:1], kd_mask[:1], ce_weight=0.0)
    out.loss.backward()
    expected = torch.tensor([[0.5 - 0.6, 0.2 * (1 - 0.2 / 0.3), 0.2 - 0.2, 0.1 * (1 - 0.2 / 0.3)]])
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn", LOSSES)
def test_tail_is_stable_when_student_is_confident(fn):
    """Student mass off the support is 3e^-50 / (1 + 3e^-50): 1 - sum(probs) would be 0 in fp32, logsumexp is not."""
    hidden = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    ids, logprobs, tail = torch.tensor([[0]]), torch.tensor([[math.log(0.5)]]), torch.tensor([math.log(0.5)])
    out = fn(hidden, torch.eye(4), torch.tensor([IGNORE_INDEX]), ids, logprobs, tail, torch.tensor([True]))
    log_q_tail = math.log(3) - 50 - math.log1p(3 * math.exp(-50))
    expected = 0.5 * (math.log(0.5) + math.log1p(3 * math.exp(-50))) + 0.5 * (math.log(0.5) - log_q_tail)
    assert out.kd.item() == pytest.approx(expected, rel=1e-5)


def _self_teacher(k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, h, v = 9, 8, 30
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    logp = (hidden @ weight.t()).double().log_softmax(-1)  # the student's own distribution, exact
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(1, ids, -math.inf)
    tail = torch.logsumexp(rest, -1) if k < v else torch.full((n,), -100.0, dtype=torch.float64)
    labels = torch.full((n,), IGNORE_INDEX)
    return hidden, weight, labels, ids, top.float(), tail.float(), torch.ones(n, dtype=torch.bool)


@pytest.mark.parametrize("k", [5, 30])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_zero_kd_for_identical_distributions(k, kind, temperature):
    hidden, weight, *targets = _self_teacher(k, seed=k)
    hidden.requires_grad_(True)
    out = fused_ce_kd_loss(hidden, weight, *targets, ce_weight=0.0, config=KDConfig(kind=kind, temperature=temperature))
    out.loss.backward()
    assert out.n_kd == 9
    assert abs(out.kd.item()) < 1e-5
    assert hidden.grad.abs().max().item() < 1e-5
    tail = targets[3]
    expected_covered = 1.0 if k == 30 else (1 - tail.double().exp()).mean().item()
    assert out.covered_mass.item() == pytest.approx(expected_covered, rel=1e-5)
    assert out.top1_agree.item() == 1.0
