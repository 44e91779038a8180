"""The fused chunked CE + KD against plain full-vocabulary PyTorch (F.cross_entropy, F.kl_div), values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses import IGNORE_INDEX, KDConfig, fused_ce_kd_loss, naive_ce_kd_loss

N, H, V = 23, 12, 40
KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl")


def _full_vocab_batch(seed: int = 0):
    """K = V targets: every id listed (sorted by teacher log-prob), tail at the cache floor."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.5
    teacher_logits = torch.randn(N, V, generator=gen) * 2
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::4] = IGNORE_INDEX
    kd_mask = torch.rand(N, generator=gen) > 0.25
    logprobs, ids = teacher_logits.log_softmax(-1).sort(dim=-1, descending=True)
    tail = torch.full((N,), -100.0)
    return hidden, weight, labels, ids, logprobs, tail, kd_mask, teacher_logits


def _plain_loss(hidden, weight, labels, teacher_logits, kd_mask, kind, temperature, beta, ce_w, kd_w):
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    log_q = torch.log_softmax(logits[kd_mask] / temperature, -1)
    log_p = torch.log_softmax(teacher_logits[kd_mask] / temperature, -1)
    kl = lambda a, b: F.kl_div(b, a, log_target=True, reduction="none").sum(-1)  # noqa: E731  KL(a || b)
    if kind == "forward_kl":
        rows = kl(log_p, log_q)
    elif kind == "reverse_kl":
        rows = kl(log_q, log_p)
    elif kind == "skew_kl":  # KL(p || beta p + (1 - beta) q)
        rows = kl(log_p, torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp()))
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        rows = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    kd = rows.mean() * temperature**2
    return ce_w * ce + kd_w * kd, ce, kd


def _grads(fn, hidden, weight, *args, **kwargs):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    out = fn(hidden, weight, *args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out[0]
    loss.backward()
    return out, hidden.grad, weight.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_fused_equals_plain_full_vocabulary(kind, chunk_size):
    temperature = 1.0 if chunk_size in (1, 64) else 2.0
    hidden, weight, labels, ids, logprobs, tail, kd_mask, teacher_logits = _full_vocab_batch()
    cfg = KDConfig(kind=kind, temperature=temperature, jsd_beta=0.3, skew_alpha=0.3, chunk_size=chunk_size)
    out, gh, gw = _grads(
        fused_ce_kd_loss, hidden, weight, labels, ids, logprobs, tail, kd_mask, ce_weight=0.6, kd_weight=1.7, config=cfg
    )
    (ref, ce, kd), rh, rw = _grads(
        _plain_loss, hidden, weight, labels, teacher_logits, kd_mask, kind, temperature, 0.3, 0.6, 1.7
    )
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce, ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd, kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
    assert out.n_ce == int((labels != IGNORE_INDEX).sum()) and out.n_kd == int(kd_mask.sum())
    assert ref.item() > 0.1  # a real loss, not a degenerate zero


def _sparse_batch(seed: int, k: int = 6, empty_slots: bool = True):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen)
    teacher = torch.randn(N, V, generator=gen).log_softmax(-1)
    logprobs, ids = teacher.topk(k, dim=-1)
    tail = torch.log1p(-logprobs.exp().sum(-1))
    if empty_slots:  # cross-tokenizer padding in the middle of rows, with garbage log-probs
        ids[::3, 2] = -1
        ids[1::5, -2:] = -1
        logprobs[ids < 0] = 123.0
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[1::4] = IGNORE_INDEX
    return hidden, weight, labels, ids, logprobs, tail, torch.rand(N, generator=gen) > 0.3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_tail", [True, False])
def test_fused_equals_naive_sparse_with_tail_and_empty_slots(kind, use_tail):
    hidden, weight, *targets = _sparse_batch(1)
    cfg = KDConfig(kind=kind, temperature=1.5, use_tail=use_tail, chunk_size=6)
    a, ah, aw = _grads(fused_ce_kd_loss, hidden, weight, *targets, kd_weight=2.0, config=cfg)
    b, bh, bw = _grads(naive_ce_kd_loss, hidden, weight, *targets, kd_weight=2.0, config=cfg)
    for field in ("loss", "ce", "kd", "top1_agree", "covered_mass"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ah, bh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(aw, bw, rtol=1e-4, atol=1e-6)
    assert a.kd.item() > 0.01


def test_masked_rows_and_empty_slots_change_nothing():
    hidden, weight, labels, ids, logprobs, tail, kd_mask = _sparse_batch(2, empty_slots=False)
    cfg = KDConfig(chunk_size=4)
    base, bh, bw = _grads(fused_ce_kd_loss, hidden, weight, labels, ids, logprobs, tail, kd_mask, config=cfg)
    # Same rows plus junk rows (no label, no KD), and every row's slots padded with -1 slots holding garbage.
    junk = 7
    hidden2 = torch.cat([hidden, torch.randn(junk, H) * 50])
    labels2 = torch.cat([labels, torch.full((junk,), IGNORE_INDEX)])
    pad = torch.full((N + junk, 3), -1)
    ids_rep, lp_rep = torch.cat([ids, ids[:junk]]), torch.cat([logprobs, logprobs[:junk]])
    ids2 = torch.cat([ids_rep[:, :2], pad, ids_rep[:, 2:]], 1)
    lp2 = torch.cat([lp_rep[:, :2], torch.full((N + junk, 3), 5.0), lp_rep[:, 2:]], 1)
    tail2 = torch.cat([tail, tail[:junk]])
    kd2 = torch.cat([kd_mask, torch.zeros(junk, dtype=torch.bool)])
    out, gh, gw = _grads(fused_ce_kd_loss, hidden2, weight, labels2, ids2, lp2, tail2, kd2, config=cfg)
    torch.testing.assert_close(out.loss, base.loss)
    torch.testing.assert_close(gh[:N], bh)
    assert torch.all(gh[N:] == 0)
    torch.testing.assert_close(gw, bw)
    assert (out.n_ce, out.n_kd) == (base.n_ce, base.n_kd)


def test_rows_without_kd_get_no_kd_gradient():
    hidden, weight, labels, ids, logprobs, tail, _ = _sparse_batch(3)
    labels[:] = IGNORE_INDEX
    off = torch.zeros(N, dtype=torch.bool)
    out, gh, gw = _grads(fused_ce_kd_loss, hidden, weight, labels, ids, logprobs, tail, off)
    assert out.loss.item() == 0.0 and out.n_kd == 0 and out.n_ce == 0
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_explicit_denominators_scale_loss_not_stats():
    hidden, weight, *targets = _sparse_batch(4)
    own = fused_ce_kd_loss(hidden, weight, *targets, ce_weight=1.0, kd_weight=0.5)
    scaled = fused_ce_kd_loss(
        hidden, weight, *targets, ce_weight=1.0, kd_weight=0.5,
        ce_denominator=torch.tensor(4.0 * own.n_ce), kd_denominator=2.0 * own.n_kd,
    )
    torch.testing.assert_close(scaled.loss, own.ce / 4 + 0.5 * own.kd / 2)
    torch.testing.assert_close(scaled.ce, own.ce)
    torch.testing.assert_close(scaled.kd_sum, own.kd * own.n_kd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_close_to_fp32(dtype):
    hidden, weight, *targets = _sparse_batch(5)
    hidden, weight = hidden.to(dtype), (weight * 0.3).to(dtype)
    cfg = KDConfig(kind="jsd", chunk_size=8)
    low, lh, lw = _grads(fused_ce_kd_loss, hidden, weight, *targets, config=cfg)
    ref, rh, rw = _grads(fused_ce_kd_loss, hidden.float(), weight.float(), *targets, config=cfg)
    assert lh.dtype == dtype and lw.dtype == dtype
    assert torch.isfinite(low.loss) and torch.isfinite(lh.float()).all() and torch.isfinite(lw.float()).all()
    # Logits are built in fp32 from the same (rounded) values, so only the final cast of the grads differs.
    torch.testing.assert_close(low.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lh.float(), rh, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(lw.float(), rw, rtol=1e-2, atol=1e-4)


def test_fp16_gradient_scaled_before_cast():
    """A loss scale applied through grad_output must lift gradients that would underflow fp16 if cast first."""
    hidden, weight, *targets = _sparse_batch(6)
    hidden, weight = hidden.half().requires_grad_(True), weight.half().requires_grad_(True)
    scale, den = 2.0**24, 1e9  # unscaled grads ~1e-10: below fp16's smallest subnormal (6e-8)
    (fused_ce_kd_loss(hidden, weight, *targets, ce_denominator=den, kd_denominator=den).loss * scale).backward()
    ref = naive_ce_kd_loss(hidden.float(), weight.float(), *targets, ce_denominator=den, kd_denominator=den)
    ref_h, ref_w = torch.autograd.grad(ref.loss * scale, [hidden, weight])
    assert hidden.grad.abs().max() > 0 and torch.isfinite(hidden.grad).all()
    torch.testing.assert_close(hidden.grad.float(), ref_h.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad.float(), ref_w.float(), rtol=1e-2, atol=1e-3)


def test_tied_embeddings_get_both_gradients():
    torch.manual_seed(7)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    input_ids = torch.randint(0, V, (N,))
    _, _, labels, ids, logprobs, tail, kd_mask = _sparse_batch(7)

    def run(fn):
        emb.zero_grad()
        proj.zero_grad()
        hidden = torch.tanh(proj(emb(input_ids)))
        fn(hidden, emb.weight, labels, ids, logprobs, tail, kd_mask).loss.backward()
        return emb.weight.grad.clone(), proj.weight.grad.clone()

    fused_emb, fused_proj = run(fused_ce_kd_loss)
    naive_emb, naive_proj = run(naive_ce_kd_loss)
    torch.testing.assert_close(fused_emb, naive_emb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_proj, naive_proj, rtol=1e-4, atol=1e-6)
    # The embedding rows of the input tokens get the input-side gradient on top of the head gradient.
    hidden = torch.tanh(proj(emb(input_ids))).detach()
    _, _, head_only = _grads(fused_ce_kd_loss, hidden, emb.weight.detach(), labels, ids, logprobs, tail, kd_mask)
    used = torch.unique(input_ids)
    assert (fused_emb[used] - head_only[used]).abs().max() > 1e-6


def test_bad_inputs_raise_one_line_errors():
    hidden, weight, labels, ids, logprobs, tail, kd_mask = _sparse_batch(8)
    bad = ids.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match="topk_ids"):
        fused_ce_kd_loss(hidden, weight, labels, bad, logprobs, tail, kd_mask)
    with pytest.raises(ValueError, match="kind"):
        fused_ce_kd_loss(hidden, weight, labels, ids, logprobs, tail, kd_mask, config=KDConfig(kind="kl"))
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        fused_ce_kd_loss(hidden, weight, labels.clamp(min=0) - 1, ids, logprobs, tail, kd_mask)
    with pytest.raises(ValueError, match="tail_logprob"):
        fused_ce_kd_loss(hidden, weight, labels, ids, logprobs, tail[:-1], kd_mask)


def test_int32_ids_and_empty_batch():
    hidden, weight, labels, ids, logprobs, tail, kd_mask = _sparse_batch(9)
    ref = fused_ce_kd_loss(hidden, weight, labels, ids, logprobs.half(), tail, kd_mask)
    narrow = fused_ce_kd_loss(hidden, weight, labels.int(), ids.int(), logprobs.half(), tail, kd_mask)
    torch.testing.assert_close(narrow.loss, ref.loss)
    empty = torch.zeros(0, H, requires_grad=True)
    out = fused_ce_kd_loss(empty, weight, labels[:0], ids[:0], logprobs[:0], tail[:0], kd_mask[:0])
    out.loss.backward()
    assert out.loss.item() == 0.0 and (out.n_ce, out.n_kd) == (0, 0) and empty.grad.shape == (0, H)


def test_frozen_head_gets_no_gradient_and_hidden_grads_unchanged():
    hidden, weight, *targets = _sparse_batch(10)
    cfg = KDConfig(kind="reverse_kl", chunk_size=3)
    _, full_h, _ = _grads(fused_ce_kd_loss, hidden, weight, *targets, config=cfg)
    hidden = hidden.clone().requires_grad_(True)
    fused_ce_kd_loss(hidden, weight, *targets, config=cfg).loss.backward()  # weight.requires_grad is False
    torch.testing.assert_close(hidden.grad, full_h)
    assert weight.grad is None
