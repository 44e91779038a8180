"""Distillation losses: CE on the labels plus KD on the teacher's sparse top-k, from hidden states and the LM head.

Shapes: N = rows (tokens, flattened batch x positions), H = student hidden, V = student vocab (LM-head rows),
K = teacher top-k.

KD is computed over K + 1 buckets: the teacher's listed ids (the support) and one tail bucket.
- Teacher tail: `tail_logprob` = log(1 - sum of the top-k probabilities), from the cache.
- Student tail: 1 - sum of the student's probabilities on the support, computed stably as
  logsumexp(logits outside the support) - logsumexp(all logits).
- `use_tail=False` drops the tail bucket: both distributions are renormalised over the support (ablation).
- Empty slots (`topk_ids == -1`, cross-tokenizer padding) are ignored everywhere. If the support covers the whole
  vocabulary there is no tail bucket (the teacher's tail is then only the cache's floor).
- Temperature T: both bucket distributions are softmax(log-mass / T) and KD is multiplied by T^2. Listed tokens are
  tempered exactly as in full-vocabulary KD; the tail bucket is tempered as one token (see `bucket_kd`).
- KD rows: `kd_mask` and at least one non-empty slot. CE rows: label != IGNORE_INDEX.

`fused_ce_kd_loss` never builds [N, V] logits (see `distill.losses.kernel`); `naive_ce_kd_loss` is the same loss
computed the plain way with full logits and autograd (the reference for tests and the benchmark baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.losses.kernel import IGNORE_INDEX, KD_KINDS, FusedCEKD, bucket_kd, teacher_top1

__all__ = ["IGNORE_INDEX", "KDConfig", "CEKDOutput", "fused_ce_kd_loss", "naive_ce_kd_loss"]

# From `python -m bench.bench_loss --chunks 256,512,1024` (CPU, fp32, N=8192, H=576, K=256): time per step is flat
# across 256-1024 rows (10.1-10.8 s at V=49,152; 33-37 s at V=151,936) while peak memory grows with the chunk
# (183 / 236 / 367 MiB at V=49,152; 514 / 662 / 974 MiB at V=151,936), so the smallest measured chunk wins.
DEFAULT_CHUNK_SIZE = 256


@dataclass
class KDConfig:
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    jsd_beta: float = 0.5  # JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q
    use_tail: bool = True  # tail bucket on (default) or off (renormalise over the top-k support)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # rows per chunk of the fused kernel: memory ~ 2-3 x chunk x V x 4 bytes

    def validate(self) -> KDConfig:
        """Raise ValueError (one line, naming the field and the fix) for impossible settings; return self."""
        if self.kind not in KD_KINDS:
            raise ValueError(f"KDConfig.kind={self.kind!r} is unknown; use one of {', '.join(KD_KINDS)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"KDConfig.temperature={self.temperature} must be a positive finite number")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"KDConfig.jsd_beta={self.jsd_beta} must be strictly between 0 and 1")
        if int(self.chunk_size) < 1:
            raise ValueError(f"KDConfig.chunk_size={self.chunk_size} must be a positive number of rows")
        return self


@dataclass
class CEKDOutput:
    loss: torch.Tensor  # scalar, differentiable: ce_weight * ce_sum / ce_den + kd_weight * kd_sum / kd_den
    ce: torch.Tensor  # scalar, detached: mean CE over rows with a label (own count, whatever the denominator)
    kd: torch.Tensor  # scalar, detached: mean KD over KD rows (own count)
    n_ce: int  # rows with a label
    n_kd: int  # KD rows (kd_mask and at least one non-empty slot)
    top1_agree: torch.Tensor  # scalar, detached: fraction of kd rows where student argmax == teacher top-1
    covered_mass: torch.Tensor  # scalar, detached: mean student probability mass on the teacher's top-k ids
    ce_sum: torch.Tensor | None = None  # scalar, detached: summed CE (for exact averaging across ranks / steps)
    kd_sum: torch.Tensor | None = None  # scalar, detached: summed KD


def _check_inputs(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask) -> None:
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.ndim != 2 or weight.shape[1] != h:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [V, {h}] to match hidden [N, {h}]")
    k = topk_ids.shape[-1]
    expected = {"labels": (n,), "topk_ids": (n, k), "topk_logprobs": (n, k), "tail_logprob": (n,), "kd_mask": (n,)}
    given = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprob=tail_logprob)
    given["kd_mask"] = kd_mask
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(given[name].shape)}; expected {shape} (N={n} rows, K={k})")
    if kd_mask.dtype != torch.bool:
        raise ValueError(f"kd_mask has dtype {kd_mask.dtype}; pass a bool tensor")
    if n and (int(topk_ids.max()) >= v or int(labels.max()) >= v):
        raise ValueError(f"topk_ids/labels hold ids >= V={v} (the LM-head rows); map teacher ids to student ids first")
    if n and bool(((labels < 0) & (labels != IGNORE_INDEX)).any()):
        raise ValueError(f"labels hold negative ids other than IGNORE_INDEX={IGNORE_INDEX}; mark missing ones with it")


def _scale(weight: float, denominator, count: int, device: torch.device) -> torch.Tensor:
    den = torch.as_tensor(max(count, 1) if denominator is None else denominator, dtype=torch.float32, device=device)
    return torch.as_tensor(weight, dtype=torch.float32, device=device) / den


def _output(loss, stats: torch.Tensor, n_ce: int, n_kd: int) -> CEKDOutput:
    stats = stats.detach()
    return CEKDOutput(
        loss=loss,
        ce=stats[0] / max(n_ce, 1),
        kd=stats[1] / max(n_kd, 1),
        n_ce=n_ce,
        n_kd=n_kd,
        top1_agree=stats[2] / max(n_kd, 1),
        covered_mass=stats[3] / max(n_kd, 1),
        ce_sum=stats[0],
        kd_sum=stats[1],
    )


def fused_ce_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    config: KDConfig | None = None,
    ce_denominator: float | torch.Tensor | None = None,
    kd_denominator: float | torch.Tensor | None = None,
) -> CEKDOutput:
    """CE on `labels` plus KD on the sparse teacher targets, from hidden states and the LM-head weight, chunked.

    Args:
        hidden: [N, H] student final hidden states (fp32, bf16 or fp16; logits are built in fp32).
        weight: [V, H] LM-head weight (the full weight: under ZeRO-3 the caller gathers it; tied embeddings are fine).
        labels: [N] int64 next-token ids, IGNORE_INDEX where there is none.
        topk_ids: [N, K] int64 teacher ids (student vocabulary), -1 = empty slot; no duplicate ids within a row.
        topk_logprobs: [N, K] teacher log-probs (normalised over the teacher vocabulary).
        tail_logprob: [N] log of the teacher mass outside the top-k.
        kd_mask: [N] bool, rows where KD applies.
        ce_denominator / kd_denominator: divide the summed CE / KD by these (e.g. global token counts across
            gradient accumulation and ranks) instead of this call's own counts (the default, None).
    Memory: O(chunk_size x V + V x H); gradients for hidden and weight are computed in the forward.
    """
    config = (config or KDConfig()).validate()
    _check_inputs(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask)
    labels, topk_ids = labels.long(), topk_ids.long()  # gather/scatter index dtype (the cache may hold int32)
    kd_row = kd_mask & (topk_ids >= 0).any(-1)
    n_ce, n_kd = int((labels != IGNORE_INDEX).sum()), int(kd_row.sum())
    options = (config.kind, float(config.temperature), float(config.jsd_beta), bool(config.use_tail))
    if not torch.is_grad_enabled():
        # Evaluation: `needs_input_grad` follows requires_grad, not grad mode; detaching skips the gradient buffers
        # and the two extra matmuls per chunk that nobody would read.
        hidden, weight = hidden.detach(), weight.detach()
    # The kernel builds its logits in fp32 on purpose: under native AMP (fp16/bf16 autocast, e.g. the P100 recipe)
    # the matmul would otherwise come back in half precision.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, stats = FusedCEKD.apply(
            hidden,
            weight,
            labels,
            topk_ids,
            topk_logprobs,
            tail_logprob,
            kd_row,
            _scale(ce_weight, ce_denominator, n_ce, hidden.device),
            _scale(kd_weight, kd_denominator, n_kd, hidden.device),
            (*options, int(config.chunk_size)),
        )
    return _output(loss, stats, n_ce, n_kd)


def naive_ce_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    config: KDConfig | None = None,
    ce_denominator: float | torch.Tensor | None = None,
    kd_denominator: float | torch.Tensor | None = None,
) -> CEKDOutput:
    """The same loss as `fused_ce_kd_loss` with full [N, V] fp32 logits and plain autograd (reference/baseline)."""
    config = (config or KDConfig()).validate()
    _check_inputs(hidden, weight, labels, topk_ids, topk_logprobs, tail_logprob, kd_mask)
    labels, topk_ids = labels.long(), topk_ids.long()
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.float() @ weight.float().t()  # [N, V] fp32 even under AMP
    vocab = logits.shape[1]
    has_label = labels != IGNORE_INDEX
    slot_valid = (topk_ids >= 0) & kd_mask[:, None]
    kd_row = slot_valid.any(-1)
    ids0 = topk_ids.clamp(min=0)
    ce_sum = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    lse_all = torch.logsumexp(logits, dim=1)
    on_support = torch.zeros_like(logits).scatter_add_(1, ids0, slot_valid.float()) > 0
    # A finite fill, not -inf: rows whose support covers the vocabulary would otherwise backpropagate NaN.
    lse_tail = torch.logsumexp(logits.masked_fill(on_support, -1.0e30), dim=1)
    tail_exists = on_support.sum(1) < vocab
    student = torch.cat([logits.gather(1, ids0), torch.where(tail_exists, lse_tail, 0.0)[:, None]], dim=1)
    teacher = torch.cat([topk_logprobs.float(), tail_logprob.float()[:, None]], dim=1)
    valid = torch.cat([slot_valid, (kd_row & tail_exists & config.use_tail)[:, None]], dim=1)
    kd_rows = bucket_kd(
        student, teacher, valid, kind=config.kind, temperature=config.temperature, jsd_beta=config.jsd_beta
    )
    kd_sum = torch.where(kd_row, kd_rows, 0.0).sum()
    n_ce, n_kd = int(has_label.sum()), int(kd_row.sum())
    loss = _scale(ce_weight, ce_denominator, n_ce, hidden.device) * ce_sum
    loss = loss + _scale(kd_weight, kd_denominator, n_kd, hidden.device) * kd_sum
    with torch.no_grad():
        covered = torch.exp(torch.logsumexp(logits.gather(1, ids0).masked_fill(~slot_valid, -math.inf), 1) - lse_all)
        top1 = (logits.argmax(1) == teacher_top1(topk_ids, topk_logprobs, slot_valid)) & kd_row
        stats = torch.stack([ce_sum, kd_sum, top1.sum(), torch.where(kd_row, covered, 0.0).sum()])
    return _output(loss, stats, n_ce, n_kd)
