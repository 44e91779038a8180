"""Sampled (RS-KD) targets through the CE + KD loss: log(count / N) on the distinct sampled ids, tail -inf, -1 padding.

Checks: fused == naive (values and gradients) and both == the plain full-vocabulary formula; the gradient w.r.t. the
student logits is T * (q - counts/N); divergences not defined on a sample are refused with the reason; and the expected
gradient over many draws converges to full-vocabulary KD while top-k targets stay biased (angle / norm ratio printed).
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_testing import loss_and_grads as _grads

from distill.losses import IGNORE_INDEX, KDConfig, check_kd_for_targets, fused_ce_kd_loss, naive_ce_kd_loss

LOSSES = (fused_ce_kd_loss, naive_ce_kd_loss)


def draw_targets(probs: torch.Tensor, n: int, gen: torch.Generator, slots: int | None = None):
    """probs [R, V] -> the per-example fields of sampled targets: ids [R, K] (distinct sampled ids, -1 padded),
    logprobs [R, K] = log(count / n) (garbage 7.0 in padding), tail [R] = -inf, counts [R, V] (dense, for checks)."""
    samples = torch.multinomial(probs, n, replacement=True, generator=gen)
    counts = torch.zeros_like(probs).scatter_add_(1, samples, torch.ones_like(samples, dtype=probs.dtype))
    k = slots or int((counts > 0).sum(1).max())
    top, ids = counts.topk(k, dim=1)
    ids[top == 0] = -1
    logprobs = torch.where(top > 0, (top / n).log(), 7.0)
    return ids, logprobs, torch.full((probs.shape[0],), -math.inf), counts


def _batch(seed: int, n_rows: int = 19, h: int = 10, v: int = 37, n: int = 16, temperature: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n_rows, h, generator=gen), torch.randn(v, h, generator=gen)
    probs = (torch.randn(n_rows, v, generator=gen) * 2.5 / temperature).softmax(-1)
    ids, logprobs, tail, counts = draw_targets(probs, n, gen, slots=n + 2)  # extra empty slots: padding
    labels = torch.randint(0, v, (n_rows,), generator=gen)
    labels[::3] = IGNORE_INDEX
    kd_mask = torch.rand(n_rows, generator=gen) > 0.2
    return hidden, weight, labels, ids, logprobs, tail, kd_mask, counts


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_equals_naive_on_sampled_targets(chunk_size, temperature):
    hidden, weight, *targets, _ = _batch(chunk_size, temperature=temperature)
    cfg = KDConfig(temperature=temperature, targets="sampled", chunk_size=chunk_size)
    a, ah, aw = _grads(fused_ce_kd_loss, hidden, weight, *targets, ce_weight=0.7, kd_weight=1.3, config=cfg)
    b, bh, bw = _grads(naive_ce_kd_loss, hidden, weight, *targets, ce_weight=0.7, kd_weight=1.3, config=cfg)
    for field in ("loss", "ce", "kd", "top1_agree", "covered_mass"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ah, bh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(aw, bw, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(ah).all() and torch.isfinite(aw).all()
    assert a.kd.item() > 0.05 and a.n_kd == int(targets[-1].sum())


@pytest.mark.parametrize("fn", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_sampled_kd_is_plain_cross_entropy_on_counts(fn, temperature):
    """With an identity head the hidden states ARE the logits z: KD = T^2 sum_i c_i/N (log(c_i/N) - log q_i) with
    q = softmax(z / T) over the whole vocabulary, and d KD / d z = T * (q - counts/N) (mean over KD rows)."""
    _, _, _, ids, logprobs, tail, kd_mask, counts = _batch(3, v=29, n=12, temperature=temperature)
    logits = torch.randn(ids.shape[0], 29, generator=torch.Generator().manual_seed(4)) * 2
    labels = torch.full((ids.shape[0],), IGNORE_INDEX)
    cfg = KDConfig(temperature=temperature, targets="sampled", chunk_size=5)
    out, grad, _ = _grads(fn, logits, torch.eye(29), labels, ids, logprobs, tail, kd_mask, ce_weight=0.0, config=cfg)
    p_hat, log_q = counts / counts.sum(1, keepdim=True), (logits / temperature).log_softmax(-1)
    rows = temperature**2 * (p_hat * (torch.where(p_hat > 0, p_hat.log(), 0.0) - log_q)).sum(1)
    n_kd = int(kd_mask.sum())
    assert out.kd.item() == pytest.approx(rows[kd_mask].mean().item(), rel=1e-5)
    expected = temperature * (log_q.exp() - p_hat) * kd_mask[:, None] / n_kd
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_divergences_undefined_on_a_sample_are_refused(kind):
    hidden, weight, *targets, _ = _batch(5)
    cfg = KDConfig(kind=kind, targets="sampled")
    for fn in LOSSES:
        with pytest.raises(ValueError, match=f"KDConfig.kind {kind} is not defined on sampled targets: .*unsampled"):
            fn(hidden, weight, *targets, config=cfg)


def test_check_kd_for_targets_lists_every_problem():
    assert check_kd_for_targets(KDConfig(kind="jsd", temperature=3.0), "topk", 0.0) == []
    assert check_kd_for_targets(KDConfig(temperature=0.7, targets="sampled"), "sampled", 0.7) == []
    problems = check_kd_for_targets(KDConfig(kind="reverse_kl", temperature=2.0, use_tail=False), "sampled", 1.0)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "--kd_kind reverse_kl is not defined on sampled targets" in text and "use forward_kl" in text
    assert "--use_tail false" in text
    assert "targets='sampled'" in text  # the KDConfig was built for top-k targets
    assert "--temperature 2 differs from the temperature the cache's samples were drawn at (1)" in text
    assert "--sample-temperature 2" in text
    assert all("\n" not in p for p in problems)
    assert "unknown" in check_kd_for_targets(KDConfig(), "logits", 1.0)[0]


def _angle_and_norm_ratio(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """[P, V] gradients -> (mean angle in degrees, mean norm ratio) against the reference, per position."""
    cos = (g * ref).sum(1) / (g.norm(dim=1) * ref.norm(dim=1))
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1))).mean().item(), (g.norm(dim=1) / ref.norm(dim=1)).mean().item()


def _mean_logit_grad(z: torch.Tensor, ids, logprobs, tail, config: KDConfig) -> torch.Tensor:
    """z [P, V] student logits; targets for R = P x M rows (M per position, grouped) -> [P, V] mean over each
    position's M rows of d KD / d z. The head trick: one-hot hidden [R, P] and weight = z^T [V, P], so the weight's
    gradient column p sums the logit gradients of position p's rows (cost R x V, not R x V x V)."""
    positions, rows = z.shape[0], ids.shape[0]
    hidden = torch.nn.functional.one_hot(torch.arange(rows) // (rows // positions), positions).float()
    weight = z.t().clone().requires_grad_(True)
    labels, kd_mask = torch.full((rows,), IGNORE_INDEX), torch.ones(rows, dtype=torch.bool)
    out = fused_ce_kd_loss(hidden, weight, labels, ids, logprobs, tail, kd_mask, ce_weight=0.0,
                           kd_denominator=float(rows // positions), config=config)
    out.loss.backward()
    return weight.grad.t()


def test_expected_sampled_gradient_is_full_kd_and_topk_is_biased():
    """Fixed case: V = 2048, 8 positions, Zipf-like teacher (p ~ rank^-1.5, ~80% of the mass in the top 12), student
    z = 0.6 t + N(0, 1.5^2). Full KD gradient q - p vs: the mean over M = 1000 independent draws of N = 50 samples
    (RS-KD), top-12 + tail bucket, top-12 renormalised (no tail). The paper (Anshumann et al. 2025) reports RS-KD
    4 deg / 1.0 and top-12 58 deg / 2.4 on a real LLM."""
    positions, vocab, n, draws, k = 8, 2048, 50, 1000, 12
    gen = torch.Generator().manual_seed(0)
    rank = torch.argsort(torch.rand(positions, vocab, generator=gen), dim=1).float() + 1
    teacher = -1.5 * rank.log() + 0.3 * torch.randn(positions, vocab, generator=gen)
    z = 0.6 * teacher + 1.5 * torch.randn(positions, vocab, generator=gen)
    log_p = teacher.log_softmax(-1)
    full = z.softmax(-1) - log_p.exp()
    all_lp, all_ids = log_p.sort(dim=1, descending=True)  # every id listed (K = V): the kernel's full KD
    everything = _mean_logit_grad(z, all_ids, all_lp, torch.full((positions,), -100.0), KDConfig())
    torch.testing.assert_close(everything, full, rtol=1e-4, atol=1e-7)

    ids, logprobs, tail, _ = draw_targets(log_p.exp().repeat_interleave(draws, 0), n, gen)
    sampled = _mean_logit_grad(z, ids, logprobs, tail, KDConfig(targets="sampled"))
    single = _mean_logit_grad(z, ids[::draws], logprobs[::draws], tail[::draws], KDConfig(targets="sampled"))
    top_lp, top_ids = log_p.topk(k, dim=1)
    top_tail = torch.log1p(-top_lp.exp().sum(1))
    with_tail = _mean_logit_grad(z, top_ids, top_lp, top_tail, KDConfig())
    no_tail = _mean_logit_grad(z, top_ids, top_lp, top_tail, KDConfig(use_tail=False))
    results = {
        f"sampled N={n}, mean of {draws} draws": _angle_and_norm_ratio(sampled, full),
        f"sampled N={n}, one draw": _angle_and_norm_ratio(single, full),
        f"top-{k} + tail": _angle_and_norm_ratio(with_tail, full),
        f"top-{k}, no tail": _angle_and_norm_ratio(no_tail, full),
    }
    distinct = (ids >= 0).sum(1).float().mean().item()
    print(f"\nV={vocab}, {positions} positions, {distinct:.1f} distinct ids per draw of N={n}")
    for name, (angle, ratio) in results.items():
        print(f"{name:32s} angle {angle:6.2f} deg  norm ratio {ratio:5.3f}")
    angle, ratio = results[f"sampled N={n}, mean of {draws} draws"]
    assert angle < 2.0 and abs(ratio - 1) < 0.02  # unbiased: only the 1/sqrt(draws) noise is left
    assert results[f"top-{k} + tail"][0] > 3 * angle  # biased: more draws would not bring it closer
    assert results[f"top-{k}, no tail"][0] > 30.0



def test_builder_sampler_at_temperature_two_gives_tempered_full_kd():
    """End to end with the cache builder's sampler: draws at sample temperature 2 (`cache_tools.sampling`), stored as
    the per-example fields, trained at T = 2: the mean gradient over draws is full-vocabulary tempered KD's,
    T * (softmax(z / T) - softmax(t / T)). The same samples at T = 1 (what `check_kd_for_targets` refuses) are not."""
    from cache_tools.sampling import sample_targets

    positions, vocab, n, draws, temperature = 4, 512, 50, 4000, 2.0
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(positions, vocab, generator=gen) * 4
    z = 0.5 * teacher + torch.randn(positions, vocab, generator=gen)
    uniforms = torch.rand(positions * draws, n, generator=gen, dtype=torch.float64)
    ids, counts = sample_targets(teacher.repeat_interleave(draws, 0), uniforms, temperature)
    logprobs = torch.where(counts > 0, (counts.float() / n).log(), 0.0)
    tail = torch.full((ids.shape[0],), -math.inf)
    full = temperature * ((z / temperature).softmax(-1) - (teacher / temperature).softmax(-1))
    at_t = _mean_logit_grad(z, ids, logprobs, tail, KDConfig(temperature=temperature, targets="sampled"))
    angle, ratio = _angle_and_norm_ratio(at_t, full)
    at_1 = _mean_logit_grad(z, ids, logprobs, tail, KDConfig(temperature=1.0, targets="sampled"))
    wrong_angle, wrong_ratio = _angle_and_norm_ratio(at_1, full)
    print(f"\nsamples at T=2, KD at T=2: {angle:.2f} deg / {ratio:.3f}; KD at T=1: {wrong_angle:.2f} deg / "
          f"{wrong_ratio:.3f}")
    assert angle < 2.0 and abs(ratio - 1) < 0.02
    assert wrong_angle > 5 * angle or abs(wrong_ratio - 1) > 0.2
