"""Sampled (RS-KD) targets: `sample_targets` draws from the right distribution, deterministically, in any chunking."""

from __future__ import annotations

import math

import pytest
import torch

from cache_tools import sampling
from cache_tools.format.errors import NonFiniteLogits, UserError
from cache_tools.teacher import sample_targets, sequence_uniforms


def _frequencies(ids: torch.Tensor, counts: torch.Tensor, vocab: int) -> torch.Tensor:
    """Pooled empirical frequencies over every row of a (ids, counts) result."""
    keep = ids >= 0
    totals = torch.zeros(vocab, dtype=torch.float64)
    totals.scatter_add_(0, ids[keep], counts[keep].double())
    return totals / totals.sum()


def _chi_square(freq: torch.Tensor, probs: torch.Tensor, draws: int) -> tuple[float, int]:
    """Pearson statistic over the cells of expected count >= 5 (the rest pooled into one cell), and its dof."""
    expected, observed = probs * draws, freq * draws
    big = expected >= 5
    exp_cells = torch.cat([expected[big], expected[~big].sum()[None]])
    obs_cells = torch.cat([observed[big], observed[~big].sum()[None]])
    stat = float(((obs_cells - exp_cells) ** 2 / exp_cells.clamp_min(1e-12)).sum())
    return stat, int(big.sum())


def _repeated(logits_row: torch.Tensor, rows: int, n: int, seed: int = 0):
    logits = logits_row[None, :].expand(rows, -1).contiguous()
    uniforms = sequence_uniforms(seed, 0, rows, n)
    return logits, uniforms


def test_sequence_uniforms_depend_on_seed_and_index_only():
    a = sequence_uniforms(7, 123, 40, 16)
    assert a.dtype == torch.float64 and a.shape == (40, 16)
    assert ((a >= 0) & (a < 1)).all()
    assert torch.equal(a, sequence_uniforms(7, 123, 40, 16))  # same inputs: identical bytes
    torch.manual_seed(999)  # the global generator plays no part
    assert torch.equal(a, sequence_uniforms(7, 123, 40, 16))
    assert not torch.equal(a, sequence_uniforms(7, 124, 40, 16))
    assert not torch.equal(a, sequence_uniforms(8, 123, 40, 16))


def test_same_inputs_same_targets_in_any_chunking(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(37, 300) * 3
    uniforms = sequence_uniforms(1, 5, 37, 24)
    ids, counts = sample_targets(logits, uniforms)
    monkeypatch.setattr(sampling, "_CHUNK_BYTES", 8 * 300 * 4)  # 4 rows per chunk, last one partial
    ids_small, counts_small = sample_targets(logits, uniforms)
    assert torch.equal(ids, ids_small) and torch.equal(counts, counts_small)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ids_distinct_ascending_padded_and_counts_sum_to_n(dtype):
    torch.manual_seed(1)
    vocab, n = 200, 32
    logits = (torch.randn(50, vocab) * torch.linspace(0.1, 8, 50)[:, None]).to(dtype)  # flat to peaked rows
    ids, counts = sample_targets(logits, sequence_uniforms(3, 9, 50, n))
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32 and ids.shape == counts.shape == (50, n)
    assert (counts.sum(-1) == n).all()
    assert ((ids >= 0) == (counts > 0)).all()  # padding is -1 exactly where the count is 0
    assert (ids < vocab).all() and (ids >= -1).all()
    distinct = (counts > 0).sum(-1)
    for row in range(50):  # the valid slots come first, strictly ascending
        k = int(distinct[row])
        assert (ids[row, k:] == -1).all() and (ids[row, :k].diff() > 0).all()
    assert int(distinct[0]) > int(distinct[-1])  # flat rows spread their draws over more ids than peaked ones


def test_frequencies_converge_to_the_softmax():
    torch.manual_seed(2)
    vocab = 60
    row = torch.randn(vocab) * 2
    row[7] = row.max() + 8.0  # one dominant token
    row[-5:] = -12.0  # a tail of small but non-zero mass
    logits, uniforms = _repeated(row, rows=400, n=500)  # 200,000 draws
    ids, counts = sample_targets(logits, uniforms)
    probs = torch.softmax(row.double(), -1)
    freq = _frequencies(ids, counts, vocab)
    draws = 400 * 500
    stat, dof = _chi_square(freq, probs, draws)
    # chi-square with `dof` degrees of freedom: mean dof, sd sqrt(2 dof); 6 sd is far beyond chance.
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)
    assert float((freq - probs).abs().max()) < 5 * math.sqrt(float(probs.max()) / draws)
    # The same draws against the distribution shifted by one id (an off-by-one in the inverse CDF) fail badly.
    shifted, _ = _chi_square(freq, probs.roll(1), draws)
    assert shifted > 100 * dof


def test_temperature_changes_the_distribution_sampled():
    torch.manual_seed(3)
    vocab = 40
    row = torch.randn(vocab) * 3
    logits, uniforms = _repeated(row, rows=300, n=400)
    draws = 300 * 400
    ids, counts = sample_targets(logits, uniforms, temperature=2.0)
    freq = _frequencies(ids, counts, vocab)
    warm = torch.softmax(row.double() / 2.0, -1)
    stat, dof = _chi_square(freq, warm, draws)
    assert stat < dof + 6 * math.sqrt(2 * dof), (stat, dof)
    untempered, _ = _chi_square(freq, torch.softmax(row.double(), -1), draws)
    assert untempered > 50 * dof  # temperature 1 is not what was drawn
    with pytest.raises(UserError, match="--sample-temperature"):
        sample_targets(logits, uniforms, temperature=0.0)


def test_point_mass_and_zero_mass_tokens():
    vocab, n = 1000, 64
    logits = torch.full((3, vocab), float("-inf"))
    logits[0, 417] = 0.0  # a single finite logit: a point mass
    logits[1] = torch.linspace(0, -5, vocab)
    logits[1, 900:] = float("-inf")  # zero-probability tokens at the end of the vocabulary
    logits[2] = -2000.0
    logits[2, 3] = 0.0  # finite but so far ahead that float64 gives the others exactly zero
    uniforms = sequence_uniforms(0, 0, 3, n)
    uniforms[:, 0] = 0.0
    uniforms[:, 1] = math.nextafter(1.0, 0.0)  # the largest uniform: u * total may round up to the total
    ids, counts = sample_targets(logits, uniforms)
    assert ids[0, 0] == 417 and counts[0, 0] == n and (ids[0, 1:] == -1).all()
    assert ids[2, 0] == 3 and counts[2, 0] == n
    assert (ids[1] < 900).all() and counts[1].sum() == n
    assert ids[1, 0] == 0  # u = 0 draws the first token of non-zero mass
    # The guard for u * total rounding up to the total (u = 1, outside the contract, forces it): the row's last
    # token of non-zero mass, never a zero-mass token past it.
    draws = sampling._draw_chunk(logits[1:2], torch.ones(1, 4, dtype=torch.float64), 1.0)
    assert (draws == 899).all()


def test_non_finite_logits_name_their_rows():
    logits = torch.randn(10, 50)
    logits[3, 7] = float("nan")
    logits[8, 1] = float("inf")
    with pytest.raises(NonFiniteLogits) as caught:
        sample_targets(logits, sequence_uniforms(0, 0, 10, 8))
    assert caught.value.rows == [3, 8]
