"""Auxiliary losses: bounded for random and adversarial inputs, correct values on hand-made cases, fp32 math."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.aux import (
    PooledProjection,
    contrastive_bound,
    contrastive_loss,
    feature_loss,
    masked_mean_pool,
    pool_layers,
)


def test_masked_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pooled = masked_mean_pool(hidden.half(), mask)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    layers = pool_layers((hidden, hidden * 2, hidden * 3), [0, 2], mask)
    torch.testing.assert_close(layers, torch.stack([pooled, pooled * 3], dim=1))


def test_projection_shapes_and_grads():
    proj = PooledProjection(student_dim=6, teacher_dim=10, num_layers=3)
    out = proj(torch.randn(4, 3, 6, dtype=torch.bfloat16))
    assert out.shape == (4, 3, 10) and out.dtype == torch.float32
    feature_loss(out, torch.randn(4, 3, 10)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    with pytest.raises(ValueError, match="num_layers"):
        proj(torch.randn(4, 2, 6))


def test_feature_loss_hand_values():
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]]])
    b = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]], [[-1.0, 0.0]]])  # cos 1, 0, -1 -> 1 - cos = 0, 1, 2
    assert feature_loss(a, b).item() == pytest.approx(1.0)
    assert feature_loss(a[:1], b[:1]).item() == pytest.approx(0.0, abs=1e-7)
    assert feature_loss(a[2:], b[2:]).item() == pytest.approx(2.0)


ADVERSARIAL = {
    "huge": lambda s: s * 1e30,
    "tiny": lambda s: s * 1e-30,
    "zeros": torch.zeros_like,
    "opposite": lambda s: -s,
    "fp16_max": lambda s: torch.full_like(s, 65504.0),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_aux_losses_bounded_adversarial(case):
    torch.manual_seed(0)
    student = torch.randn(8, 2, 16)
    teacher = ADVERSARIAL[case](student)
    for s, t in [(student, teacher), (teacher, student), (ADVERSARIAL[case](student), teacher)]:
        f, c = feature_loss(s, t), contrastive_loss(s, t)
        assert torch.isfinite(f) and 0.0 <= f.item() <= 2.0
        assert torch.isfinite(c) and 0.0 <= c.item() <= 1.0


def test_aux_losses_bounded_random():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        b = int(torch.randint(2, 12, (1,), generator=gen))
        scale = 10 ** float(torch.empty(1).uniform_(-6, 6, generator=gen))
        s, t = torch.randn(b, 3, 8, generator=gen) * scale, torch.randn(b, 3, 8, generator=gen)
        temperature = float(torch.empty(1).uniform_(0.02, 2.0, generator=gen))
        assert 0.0 <= feature_loss(s, t).item() <= 2.0
        assert 0.0 <= contrastive_loss(s, t, temperature).item() <= 1.0


def test_contrastive_hits_bound_in_worst_case_and_is_low_when_aligned():
    e = torch.tensor([1.0, 0.0])
    student = torch.stack([e, -e])[:, None]  # [B=2, P=1, 2]
    teacher = -student  # own pair cos -1, the other pair cos +1: the worst case
    assert contrastive_loss(student, teacher, 0.5).item() == pytest.approx(1.0, rel=1e-6)
    best = contrastive_loss(student, student, 0.5).item()  # own pair +1, other -1
    assert best == pytest.approx(math.log1p(math.exp(-4.0)) / contrastive_bound(2, 0.5), rel=1e-5)


def test_contrastive_single_example_is_zero_with_grad():
    s = torch.randn(1, 2, 4, requires_grad=True)
    loss = contrastive_loss(s, torch.randn(1, 2, 4))
    loss.backward()
    assert loss.item() == 0.0 and s.grad is not None


def test_contrastive_learns_matching():
    """A few steps of the projection reduce both losses on a learnable pairing (the gradients point the right way)."""
    torch.manual_seed(2)
    student = torch.randn(16, 1, 8)
    teacher = student @ torch.randn(8, 12) + 0.01 * torch.randn(16, 1, 12)
    proj = PooledProjection(8, 12, 1)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        out = proj(student)
        loss = feature_loss(out, teacher) + contrastive_loss(out, teacher, 0.2)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
