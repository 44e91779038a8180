"""A Qwen-vocabulary teacher with realistic next-token distributions that `cache_tools build-cache` can run, built in
closed form (no training: on a shared 2-core machine one training step of a 151,936-row head takes 15-30 s).

The model is a real `Qwen3ForCausalLM` (151,936 head rows over the real Qwen3 tokenizer, 151,669 tokens) whose MLP
output is zeroed and whose attention output is scaled down (`ATTENTION_SCALE`), so its last hidden state is
RMSNorm(embedding of the current token + a small mix of the previous tokens' embeddings). Each token's embedding is
the one-hot vector of its context CLUSTER (the H - 1 most frequent tokens of the corpus get a cluster each, every
other token shares the last one), so the logits are column `cluster` of the LM head (times sqrt(H)) plus a small
context-dependent mix of other columns: no two positions have exactly the same distribution (a pure bigram would
repeat rows, which flatters lzf). That column holds the log of an interpolated (Witten-Bell) bigram
distribution of tinyshakespeare for the cluster's contexts, backed off to a unigram mixing the corpus counts with a
Zipf prior over ids (BPE ids come roughly in merge order) times a fixed log-normal jitter, then sharpened to the power
1 / 0.6 (a teacher more confident than a bigram model). The bench text is held out from the counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen3"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
HEAD_ROWS = 151_936
CLUSTERS = 64  # = hidden size; the head matmul (and the build) costs grow with it
SHARPEN = 1 / 0.6
HELD_OUT = 0.1  # last fraction of the corpus: bench text, not counted into the bigram
ATTENTION_SCALE = 0.25  # of the default-initialised o_proj: the context's share of each position's distribution


def available() -> bool:
    return QWEN_TOKENIZER.is_dir() and SHAKESPEARE.is_file()


def _distributions(ids: np.ndarray, vocab: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of every token [vocab] int64, log-probs [CLUSTERS, vocab] float64) from the corpus ids."""
    counts = np.bincount(ids, minlength=vocab).astype(np.float64)
    cluster = np.full(vocab, CLUSTERS - 1, dtype=np.int64)
    cluster[np.argsort(-counts, kind="stable")[: CLUSTERS - 1]] = np.arange(CLUSTERS - 1)
    prior = (np.arange(vocab) + 50.0) ** -1.1 * np.exp(rng.normal(0.0, 1.0, vocab))
    unigram = 0.9 * counts / counts.sum() + 0.1 * prior / prior.sum()
    logp = np.empty((CLUSTERS, vocab))
    for c in range(CLUSTERS):
        nexts = ids[1:][cluster[ids[:-1]] == c]
        seen = np.bincount(nexts, minlength=vocab).astype(np.float64)
        lam = nexts.size / (nexts.size + np.count_nonzero(seen))  # Witten-Bell: trust what was seen often
        p = ((1 - lam) * unigram + lam * seen / max(nexts.size, 1)) ** SHARPEN
        logp[c] = np.log(p / p.sum())
    return cluster, logp


def _model_stats(teacher: Path, ids: np.ndarray, vocab: int, window: int = 512) -> dict[str, float]:
    """Mean entropy (nats), top-1 probability and top-256 mass of the teacher's next-token distributions over `ids`,
    measured with the saved model in windows like the builder's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    sums = np.zeros(3)
    with torch.inference_mode():
        for lo in range(0, ids.size, window):
            logp = torch.log_softmax(model(input_ids=torch.from_numpy(ids[None, lo : lo + window])).logits[0, :, :vocab]
                                     .float(), -1)
            top = logp.topk(256, dim=-1).values.exp()
            sums += [float(-(logp.exp() * logp).sum()), float(top[:, 0].sum()), float(top.sum())]
    return dict(zip(("entropy_nats", "top1_prob", "top256_mass"), (sums / ids.size).tolist(), strict=True)) | {
        "tokens": int(ids.size)}


def build_teacher(root: Path, tokens: int) -> dict[str, Any]:
    """Save the teacher and a held-out text of about `tokens` tokens under `root` (once); return their paths and the
    teacher's statistics over the bench text (mean entropy in nats, mean top-1 probability, mean top-256 mass)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    root.mkdir(parents=True, exist_ok=True)
    teacher, text, stats_path = root / "teacher", root / f"text-{tokens}.txt", root / f"stats-{tokens}.json"
    if stats_path.is_file():
        return {"teacher": teacher, "text": text, **json.loads(stats_path.read_text())}
    tok = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    corpus = " ".join(SHAKESPEARE.read_text(encoding="utf-8").split())
    cut = int(len(corpus) * (1 - HELD_OUT))
    train_ids = np.asarray(tok(corpus[:cut])["input_ids"], dtype=np.int64)
    cluster, logp = _distributions(train_ids, len(tok), np.random.default_rng(0))
    held = corpus[cut:]
    enc = tok(held, return_offsets_mapping=True)
    # A margin of 16 tokens: re-tokenising at the cut may merge differently, and one token too many is a new window.
    held = held[: enc["offset_mapping"][min(tokens, len(enc["input_ids"])) - 16][1]]
    text.write_text(held + "\n", encoding="utf-8")
    if not (teacher / "config.json").is_file():
        config = Qwen3Config(vocab_size=HEAD_ROWS, hidden_size=CLUSTERS, intermediate_size=2 * CLUSTERS,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for layer in model.model.layers:  # the residual stream keeps the embedding, plus a little context
                layer.self_attn.o_proj.weight.mul_(ATTENTION_SCALE)
                layer.mlp.down_proj.weight.zero_()
            embed = torch.zeros(HEAD_ROWS, CLUSTERS)
            embed[torch.arange(len(tok)), torch.from_numpy(cluster)] = 1.0
            model.model.embed_tokens.weight.copy_(embed)
            head = torch.full((HEAD_ROWS, CLUSTERS), -30.0)  # padded rows: never candidates (and sliced off)
            head[: len(tok)] = torch.from_numpy(logp.T / np.sqrt(CLUSTERS)).float()
            model.lm_head.weight.copy_(head)
        model.save_pretrained(teacher)
        tok.save_pretrained(teacher)
    stats = {**_model_stats(teacher, np.asarray(tok(held)["input_ids"], dtype=np.int64), len(tok)),
             "construction": f"{CLUSTERS}-cluster bigram of tinyshakespeare, sharpened ^{SHARPEN:.3f}, plus "
                             f"context mixing (o_proj x {ATTENTION_SCALE})"}
    stats_path.write_text(json.dumps(stats))
    return {"teacher": teacher, "text": text, **stats}
