"""Sampled (RS-KD) targets: N draws with replacement from the teacher's distribution, stored as distinct ids + counts.

Re-exported by `cache_tools.teacher` (the build's teacher side): `sample_targets`, `sequence_uniforms`.

Why inverse CDF with uniforms made outside: the builder draws the uniforms per SEQUENCE from a generator seeded by
(seed, global sequence index) on the CPU, so the draws of a sequence depend on nothing else (not the batch it falls in,
the rank that builds it, the device, or what was resumed) and every build of the same settings is byte-identical.
`torch.multinomial` would tie the draws to the device's generator state and the batch layout.
"""

from __future__ import annotations

import hashlib
import math

import torch

from cache_tools.format.errors import NonFiniteLogits, UserError

# float64 [chunk, V] buffers per chunk are at most this many bytes (the scaled logits and their running sum).
_CHUNK_BYTES = 1 << 27



def sequence_uniforms(seed: int, global_index: int, length: int, num_samples: int) -> torch.Tensor:
    """[length, num_samples] float64 uniforms in [0, 1) for one sequence, a function of (seed, global_index) only.

    `length` is the sequence's own number of positions (its valid length), never a batch's padded length, so the
    values do not depend on which sequences share its batch. The generator is a CPU torch.Generator seeded from a
    hash of both numbers (blake2b: stable across processes and Python versions, unlike `hash()`), so resuming and any
    number of ranks reproduce the same draws."""
    if length < 0 or num_samples < 1:
        raise ValueError(f"sequence_uniforms: length {length} must be >= 0 and num_samples {num_samples} >= 1")
    digest = hashlib.blake2b(f"rs-kd:{int(seed)}:{int(global_index)}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: manual_seed takes any int < 2**64
    return torch.rand((length, num_samples), generator=generator, dtype=torch.float64)


def _distinct_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draws [rows, N] int64 -> (distinct ids [rows, N] ascending, -1 padded; counts [rows, N] int32, 0 padded).

    Vectorised over rows: sort each row, mark where a new id starts, and scatter each draw to the slot of its run."""
    rows, n = draws.shape
    ordered, _ = torch.sort(draws, dim=-1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = torch.cumsum(starts, dim=-1) - 1  # [rows, N]: index of the draw's distinct id within its row
    ids = torch.full((rows, n), -1, dtype=torch.int64, device=draws.device)
    ids.scatter_(1, slot, ordered)  # every draw of a run writes the same id to the same slot
    counts = torch.zeros((rows, n), dtype=torch.int32, device=draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    return ids, counts


def _draw_chunk(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [r, V], uniforms [r, N] float64 -> draws [r, N] int64 by inverse CDF of softmax(logits / temperature).

    The CDF is accumulated in float64 and left unnormalised (the uniforms are scaled by each row's total instead),
    so a token of probability 1e-12 is still drawn at its rate: float64 spacing near 1 is ~1e-16, fp32's ~6e-8."""
    scaled = logits.to(torch.float64)
    if temperature != 1.0:
        scaled = scaled / temperature
    scaled = scaled - scaled.amax(dim=-1, keepdim=True)
    cdf = torch.cumsum(scaled.exp_(), dim=-1)  # [r, V], non-decreasing; zero-probability tokens add a flat step
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))  # NaN/+inf anywhere in a row propagates to its total
    if bool(bad.any()):
        raise NonFiniteLogits(torch.nonzero(bad).flatten().tolist())
    targets = uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    # right=True: the first index whose CDF exceeds the target. A flat step (probability 0) is never that index.
    draws = torch.searchsorted(cdf, targets.contiguous(), right=True)
    overflow = draws >= cdf.shape[1]  # u * total rounded up to total: take the row's last token of non-zero mass
    if bool(overflow.any()):
        positive = cdf > torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1)
        last = cdf.shape[1] - 1 - torch.argmax(positive.flip(-1).to(torch.uint8), dim=-1)
        draws = torch.where(overflow, last[:, None].expand_as(draws), draws)
    return draws


@torch.inference_mode()
def sample_targets(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """N draws with replacement per row from softmax(logits / temperature), as distinct ids and their counts.

    logits [rows, V]: the TRUE vocabulary only (padded head rows already sliced off), any float dtype, any device.
    uniforms [rows, N] float64 in [0, 1) (see `sequence_uniforms`); draw j of row i is the token whose CDF interval
    holds uniforms[i, j], so the result is a deterministic function of the two inputs.
    Returns ids [rows, N] int64 (distinct, ascending, padded with -1) and counts [rows, N] int32 (0 in padding; each
    row sums to N), on the logits' device. Raises NonFiniteLogits naming the rows whose logits hold NaN / +inf.
    Rows are processed in chunks so only a few [chunk, V] float64 buffers (~128 MiB each) exist at once, even at
    V = 151,936."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--sample-temperature {temperature}: must be a positive number (1 = the teacher as is)")
    if logits.dim() != 2 or uniforms.dim() != 2 or uniforms.shape[0] != logits.shape[0]:
        raise ValueError(f"sample_targets: logits {tuple(logits.shape)} and uniforms {tuple(uniforms.shape)} must be "
                         "[rows, V] and [rows, N]")
    rows, vocab = logits.shape
    num_samples = uniforms.shape[1]
    ids = torch.empty((rows, num_samples), dtype=torch.int64, device=logits.device)
    counts = torch.empty((rows, num_samples), dtype=torch.int32, device=logits.device)
    chunk = max(1, _CHUNK_BYTES // (8 * max(1, vocab)))
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        try:
            draws = _draw_chunk(logits[lo:hi], uniforms[lo:hi], temperature)
        except NonFiniteLogits as err:
            raise NonFiniteLogits([lo + row for row in err.rows]) from None
        ids[lo:hi], counts[lo:hi] = _distinct_counts(draws)
    return ids, counts
