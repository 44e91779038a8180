"""The teacher's LM head, chunked: final hidden states of the valid tokens -> cache targets (top-k log-probs + exact
tail, or sampled ids + counts) without ever holding [batch, seq, vocab] logits, and with padded head rows (beyond the
tokenizer's true vocabulary, as in Qwen) sliced off before any softmax. Re-exported by `cache_tools.teacher`."""

from __future__ import annotations

import math

import torch

from cache_tools.format import schema
from cache_tools.format.errors import NonFiniteLogits
from cache_tools.sampling import sample_targets

# fp32 logits per chunk are at most this many bytes (x3 for the temporaries of topk/logsumexp/scatter).
_CHUNK_LOGIT_BYTES = 1 << 27
# Block-maxima pre-filter before top-k on CPU (see `row_topk`). A module switch so `bench/bench_build.py` can time
# the plain torch.topk in the same run.
TOPK_PREFILTER = True


def row_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of logits [r, V] -> (values [r, k] descending, ids [r, k] int64).

    On CPU torch.topk over V = 151,936 costs about a fifth of the head's matmul. Instead: split each row into blocks
    of b (~sqrt(V / k), a power of two), take the k blocks with the largest maxima, and run top-k over their k*b
    entries (+ the < b entries past the last whole block, always kept). Exact: an entry whose block is not among
    those k has k block maxima >= it, so it is not in the top k. One streaming pass (the block maxima) replaces
    torch.topk's full selection; ~2x cheaper measured at V = 151,936, k = 257 (bench/bench_build.py)."""
    rows, vocab = logits.shape
    block = 1 << max(3, round(math.log2(math.sqrt(vocab / k))))
    num_blocks = vocab // block
    if not TOPK_PREFILTER or logits.device.type != "cpu" or num_blocks < 4 * k:
        return torch.topk(logits, k, dim=-1, sorted=True)
    main = num_blocks * block
    blocks = logits[:, :main].view(rows, num_blocks, block)  # a view: the last dim of the logits is contiguous
    _, best = torch.topk(blocks.amax(dim=-1), k, dim=-1, sorted=False)  # [r, k] block indices
    row_index = torch.arange(rows, device=logits.device)[:, None]
    candidates = blocks[row_index, best].flatten(1)  # [r, k * b]: whole blocks copied (cheaper than gather)
    if main < vocab:
        candidates = torch.cat([candidates, logits[:, main:]], dim=1)
    values, where = torch.topk(candidates, k, dim=-1, sorted=True)
    # Candidate position -> vocabulary id: within the k chosen blocks, or past them in the remainder.
    in_blocks = where < k * block
    block_ids = best.gather(1, (where // block).clamp_max(k - 1)) * block + where % block
    return values, torch.where(in_blocks, block_ids, where - k * block + main)


def _head_logits(hidden: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int, transform) -> torch.Tensor:
    """hidden [r, H] -> fp32 logits [r, vocab_size] of the true vocabulary (padded head rows sliced off)."""
    logits = lm_head(hidden)[:, :vocab_size].float()
    return transform(logits) if transform is not None else logits


@torch.inference_mode()
def topk_targets(
    hidden: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int, top_k: int, transform=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H] final states of N valid tokens -> (ids [N, K] int64, logprobs [N, K] fp32, tail [N] fp32).

    Rows are processed in chunks so only [chunk, V] fp32 logits exist at once; head rows >= vocab_size are sliced
    off before the softmax, so padded rows are never candidates and never take probability mass. Non-finite logits
    (NaN / +inf) come out as NaN log-probs, never silently replaced: `teacher_batch` stops the build on them."""
    n = hidden.shape[0]
    chunk = max(1, _CHUNK_LOGIT_BYTES // (4 * vocab_size))
    ids = torch.empty((n, top_k), dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty((n, top_k), dtype=torch.float32, device=hidden.device)
    tail = torch.empty((n,), dtype=torch.float32, device=hidden.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        logits = _head_logits(hidden[lo:hi], lm_head, vocab_size, transform)
        if top_k == vocab_size:  # nothing outside the top-k: the tail is empty
            top_vals, top_ids = row_topk(logits, top_k)
            total = torch.logsumexp(top_vals, dim=-1)
            rest = torch.full_like(total, float("-inf"))
        else:
            # One pass over [chunk, V] after the top-k: the (k+1)-th logit is the largest one outside the top-k, so
            # shifting by it makes logsumexp over the rest exact and underflow-free (each term <= 1, one term == 1).
            # Summing exp(rest) directly avoids log(1 - sum p), which cancels catastrophically as the top-k mass -> 1.
            vals, top_ids = row_topk(logits, top_k + 1)
            top_vals, top_ids, shift = vals[:, :top_k], top_ids[:, :top_k], vals[:, top_k : top_k + 1]
            shifted = logits.sub_(shift).exp_()  # in place: top-k entries may overflow to inf, zeroed next
            rest = shifted.scatter_(1, top_ids, 0.0).sum(dim=-1).log_() + shift[:, 0]
            rest = rest.masked_fill_(shift[:, 0] == float("-inf"), float("-inf"))  # no finite logit left: no tail
            total = torch.logaddexp(rest, torch.logsumexp(top_vals, dim=-1))
            rest = rest - total
        ids[lo:hi] = top_ids
        logprobs[lo:hi] = top_vals - total[:, None]
        tail[lo:hi] = rest.clamp_min(schema.TAIL_LOGPROB_FLOOR)  # -inf -> the floor; NaN stays NaN (checked later)
    return ids, logprobs, tail


@torch.inference_mode()
def sampled_targets(
    hidden: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int, uniforms: torch.Tensor,
    temperature: float = 1.0, transform=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], uniforms [N, S] float64 -> (distinct ids [N, S] int64 ascending, -1 padded; counts [N, S]
    int32) of S draws per token from softmax(logits / temperature) over the true vocabulary (`sample_targets`),
    with the head computed in the same row chunks as `topk_targets`. Raises NonFiniteLogits with token rows."""
    n, num_samples = hidden.shape[0], uniforms.shape[1]
    chunk = max(1, _CHUNK_LOGIT_BYTES // (4 * vocab_size))
    ids = torch.empty((n, num_samples), dtype=torch.int64, device=hidden.device)
    counts = torch.empty((n, num_samples), dtype=torch.int32, device=hidden.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        logits = _head_logits(hidden[lo:hi], lm_head, vocab_size, transform)
        try:
            ids[lo:hi], counts[lo:hi] = sample_targets(logits, uniforms[lo:hi], temperature)
        except NonFiniteLogits as err:
            raise NonFiniteLogits([lo + row for row in err.rows]) from None
    return ids, counts
