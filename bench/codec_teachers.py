"""Realistic teacher distributions at the Qwen vocabulary for the codec benchmark (no model download, 2-core friendly).

A random-init teacher is near uniform, which flatters neither the id coder nor the quantiser. Instead: an
interpolated (Witten-Bell) bigram language model of tinyshakespeare under the real Qwen3 tokenizer
(`../shared/tokenizers/qwen3`, 151,669 tokens, 151,936 head rows), backed off to a unigram that mixes the corpus
counts with a Zipf prior over token ids (BPE ids are roughly in merge order, so frequency falls with the id) times a
fixed log-normal jitter per token (so unseen tokens are not tied). Rows are evaluated at real text positions; the
"sharp" variant raises every row to the power 1/0.6 (a teacher more confident than a bigram model), which spans rows
from near one-hot to flat. Without ../shared, a purely synthetic Zipf teacher with the same shape stands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
QWEN_DIR = SHARED / "tokenizers" / "qwen3"
TEXT = SHARED / "data" / "tinyshakespeare.txt"
HEAD_ROWS = 151_936  # Qwen3 LM-head rows; the last 267 are padding and never hold mass
TRUE_VOCAB = 151_669


@dataclass
class TeacherRows:
    name: str
    logprobs: np.ndarray  # [n, HEAD_ROWS] float32, exact log-probs (-inf on padding rows)
    tokens: np.ndarray  # [n] int64, the text's next tokens (the CE labels)


def _zipf_unigram(rng: np.random.Generator, counts: np.ndarray | None) -> np.ndarray:
    prior = (np.arange(TRUE_VOCAB) + 50.0) ** -1.1 * np.exp(rng.normal(0.0, 1.0, TRUE_VOCAB))
    prior /= prior.sum()
    if counts is None:
        return prior
    return 0.9 * counts / counts.sum() + 0.1 * prior


@lru_cache(maxsize=1)
def corpus_ids() -> np.ndarray:
    """tinyshakespeare under the Qwen3 tokenizer (tokenised once per process)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN_DIR))
    tok.model_max_length = 1 << 30  # one long text on purpose: silence the sequence-length warning
    return np.asarray(tok(TEXT.read_text(encoding="utf-8"))["input_ids"], np.int64)


def bigram_rows(n: int, seed: int = 0, sharpen: float = 1.0) -> TeacherRows:
    """[n] rows of the tinyshakespeare bigram teacher (see the module docstring), as exact log-probs."""
    ids = corpus_ids()
    rng = np.random.default_rng(seed)
    unigram = _zipf_unigram(rng, np.bincount(ids, minlength=TRUE_VOCAB).astype(np.float64))
    pairs, pair_counts = np.unique(ids[:-1] * TRUE_VOCAB + ids[1:], return_counts=True)
    prev_of_pair = pairs // TRUE_VOCAB
    starts = rng.integers(0, ids.size - 1, n)  # positions: a context token and its observed next token
    probs = np.zeros((n, HEAD_ROWS), np.float64)
    for row, pos in enumerate(starts):
        lo, hi = np.searchsorted(prev_of_pair, [ids[pos], ids[pos] + 1])
        nexts, cnt = pairs[lo:hi] % TRUE_VOCAB, pair_counts[lo:hi].astype(np.float64)
        lam = cnt.sum() / (cnt.sum() + cnt.size)  # Witten-Bell: trust the bigram more the more it was seen
        probs[row, :TRUE_VOCAB] = (1 - lam) * unigram
        probs[row, nexts] += lam * cnt / cnt.sum()
    return _finish(f"bigram-qwen3{'-sharp' if sharpen != 1.0 else ''}", probs, sharpen, ids[starts + 1])


def zipf_rows(n: int, seed: int = 0, sharpen: float = 1.0) -> TeacherRows:
    """Stand-in without ../shared: per row a random Zipf distribution over a shuffled vocabulary at a random
    temperature (rows from near one-hot to flat)."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((n, HEAD_ROWS), np.float64)
    base = np.log(_zipf_unigram(rng, None))
    for row in range(n):
        rank = rng.permutation(TRUE_VOCAB)[:4096]
        logits = base.copy()
        logits[rank] += 8.0 - 1.2 * np.log1p(np.arange(rank.size))
        probs[row, :TRUE_VOCAB] = np.exp((logits - logits.max()) * rng.uniform(0.5, 2.0))
    return _finish("zipf-synthetic", probs, sharpen, rng.integers(0, TRUE_VOCAB, n))


def _finish(name: str, probs: np.ndarray, sharpen: float, tokens: np.ndarray) -> TeacherRows:
    with np.errstate(divide="ignore"):
        logp = np.log(probs) / sharpen
    logp[:, TRUE_VOCAB:] = -np.inf
    logp -= np.logaddexp.reduce(logp[:, :TRUE_VOCAB], axis=1, keepdims=True)
    return TeacherRows(name, logp.astype(np.float32), tokens)


def teacher_sets(n: int, seed: int = 0) -> list[TeacherRows]:
    """The distributions the benchmark measures: the bigram teacher plain and sharpened (or the synthetic one)."""
    if QWEN_DIR.is_dir() and TEXT.is_file():
        return [bigram_rows(n, seed), bigram_rows(n, seed + 1, sharpen=0.6)]
    return [zipf_rows(n, seed)]


def topk_targets(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [n, k] int64, log-probs [n, k] float32 sorted descending, exact tail log-mass [n] float32)."""
    part = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]
    lp = np.take_along_axis(logprobs, part, 1)
    order = np.argsort(-lp, axis=1, kind="stable")
    ids, lp = np.take_along_axis(part, order, 1), np.take_along_axis(lp, order, 1)
    covered = np.exp(lp.astype(np.float64)).sum(1)
    tail = np.log1p(-np.minimum(covered, 1.0 - 1e-12))
    return ids.astype(np.int64), lp.astype(np.float32), tail.astype(np.float32)


def entropy(logprobs: np.ndarray) -> np.ndarray:
    """[n] entropy in nats of each full row."""
    p = np.exp(logprobs.astype(np.float64))
    return -(p * np.where(p > 0, logprobs, 0.0)).sum(1)
