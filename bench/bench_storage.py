"""Storage benchmark: cache bytes per token for each target kind and encoding, at the REAL Qwen vocabulary (151,936
head rows over `../shared/tokenizers/qwen3`), every cache written by the real `cache_tools build-cache` over the same
held-out tinyshakespeare text with a teacher whose distributions are realistic (`bench.storage_teacher`: a sharpened
bigram model in closed form; its entropy and top-1 probability are reported with the table).

Every field is counted (total shard bytes / tokens); the split by dataset is `cache_tools inspect`'s (allocated chunk
bytes + variable-length payload). Ratios against the fp16 top-256 cache of the same run. Goals: compact top-256
<= 430 B/token (the teacher's rows never repeat), sampled N = 64 <= 45 B/token (format 3, zstd blobs). `--quick`
(no real vocabulary: a 512-token tiny teacher) only exercises the paths. Run alone:
`python -m bench.bench_storage [--quick]`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.common import WORK_ROOT, ratio, run_standalone, tiny_assets

MAX_LENGTH, WINDOWS = 512, 32
# One full shard of all windows: per-row costs (scalar chunks, blob references) as in a full 1024-window shard.
SHARD_SIZE = WINDOWS
# name -> build-cache flags. fp16 = today's layout (the baseline); lzf compresses array datasets only.
VARIANTS = {
    "topk fp16 k=256": ["--top-k", "256", "--encoding", "fp16"],
    "topk fp16 k=256 +lzf": ["--top-k", "256", "--encoding", "fp16", "--compression", "lzf"],
    "topk compact k=256": ["--top-k", "256", "--encoding", "compact"],
    "topk compact k=256 +lzf": ["--top-k", "256", "--encoding", "compact", "--compression", "lzf"],
    "sampled compact N=16": ["--targets", "sampled", "--samples", "16", "--encoding", "compact"],
    "sampled compact N=64": ["--targets", "sampled", "--samples", "64", "--encoding", "compact"],
    "sampled compact N=64 +lzf": ["--targets", "sampled", "--samples", "64", "--encoding", "compact",
                                  "--compression", "lzf"],
}
# The top-256 goal is for rows that never repeat (see `nonrepeating_topk_blob_bytes`).
GOALS = {"topk compact k=256 (non-repeating rows)": 430.0, "sampled compact N=64": 45.0}
QUICK = ["--max-samples", "24"]
QUICK_VARIANTS = {"topk fp16 k=32": ["--top-k", "32", *QUICK],
                  "topk compact k=32": ["--top-k", "32", "--encoding", "compact", *QUICK],
                  "sampled compact N=16": ["--targets", "sampled", "--samples", "16", "--encoding", "compact", *QUICK]}


def build(teacher: Path, text: Path, out: Path, flags: list[str], max_length: int, shard_size: int) -> None:
    """One `cache_tools build-cache` run, in-process through the CLI's `main` (same parser and code path as the
    console script, without paying a Python + torch start-up per variant)."""
    from cache_tools.cli import main

    code = main(["build-cache", "--teacher", str(teacher), "--dataset", str(text), "--output", str(out),
                 "--max-length", str(max_length), "--dtype", "fp32", "--shard-size", str(shard_size),
                 "--batch-size", "4", "--overwrite", "--no-progress", *flags])
    if code != 0:
        raise RuntimeError(f"cache_tools build-cache exited with {code} for {out}")


def cache_stats(cache_dir: Path) -> dict[str, Any]:
    from cache_tools.inspect_cache import cache_summary

    s = cache_summary(cache_dir)
    split = s["bytes_per_token_by_dataset"]
    return {"bytes_per_token": s["bytes_per_token"], "tokens": s["num_tokens"], "vocab_size": s["vocab_size"],
            "by_dataset": {k: round(v, 2) for k, v in split.items()}, "targets": s["targets"]}


def _table(sizes: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: variant, B/token total, targets part, the rest (ids, offsets, text, pooled, HDF5 overhead)."""
    target_names = {"topk_ids", "topk_logprobs", "tail_logprob", "topk_blob", "sample_ids", "sample_counts",
                    "sample_blob"}
    rows = ["| cache | bytes/token (all fields) | targets | other datasets | HDF5 overhead |", "|---|---|---|---|---|"]
    for name, stats in sizes.items():
        split = stats["by_dataset"]
        targets = sum(v for k, v in split.items() if k in target_names)
        other = sum(v for k, v in split.items() if k not in target_names)
        total = stats["bytes_per_token"]
        rows.append(f"| {name} | {total:.1f} | {targets:.1f} | {other:.1f} | {total - targets - other:.1f} |")
    return rows


NOISE_SIGMA, NOISE_WINDOWS = 0.5, 8  # per-position logit noise (nats) of the non-repeating variant; windows encoded


def nonrepeating_topk_blob_bytes(teacher: Path, text: Path, max_length: int, top_k: int = 256) -> dict[str, float]:
    """Top-k blob bytes per token when NO row repeats: the storage teacher's logits on the bench text plus i.i.d.
    Gaussian noise per position and id (a real teacher never gives two positions the same row; the closed-form
    teacher's rows share most of their support within a context cluster, which zstd finds). Encoded by the same
    codec, one blob per window, as a build would."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache_tools.format import codec_zstd

    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ids = np.asarray(tok(text.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    total, tokens = 0, 0
    with torch.inference_mode():
        for w in range(NOISE_WINDOWS):
            window = torch.from_numpy(ids[w * max_length : (w + 1) * max_length])[None]
            logits = model(input_ids=window).logits[0, :, : len(tok)].float()
            logits += NOISE_SIGMA * torch.randn(logits.shape, generator=gen)
            lp, top = torch.log_softmax(logits, -1).topk(top_k, dim=-1)
            blob = codec_zstd.encode_topk(top.numpy(), lp.numpy(), model.config.vocab_size, sequence=w)
            total, tokens = total + blob.size, tokens + window.shape[1]
    return {"topk_blob_bytes_per_token": total / tokens, "tokens": tokens, "noise_sigma_nats": NOISE_SIGMA}


def run(quick: bool, device: str) -> dict[str, Any]:
    from bench import storage_teacher

    root = WORK_ROOT / "storage"
    if quick:
        assets = tiny_assets(WORK_ROOT / "assets")
        teacher, text, variants, max_length = assets["teacher"], assets["text"], QUICK_VARIANTS, 128
        teacher_stats: dict[str, Any] = {"construction": "tiny random teacher (quick: paths only, not the goals)"}
    elif not storage_teacher.available():
        return {"status": "skipped", "reason": f"needs {storage_teacher.QWEN_TOKENIZER} and "
                                               f"{storage_teacher.SHAKESPEARE} (../shared)"}
    else:
        built = storage_teacher.build_teacher(WORK_ROOT / "storage-teacher", tokens=WINDOWS * MAX_LENGTH)
        teacher, text, variants, max_length = built.pop("teacher"), built.pop("text"), VARIANTS, MAX_LENGTH
        teacher_stats = built
    sizes: dict[str, dict[str, Any]] = {}
    for index, (name, flags) in enumerate(variants.items()):
        out = root / f"v{index}"
        build(teacher, text, out, flags, max_length, SHARD_SIZE if not quick else 1024)
        sizes[name] = cache_stats(out)
    shutil.rmtree(root, ignore_errors=True)
    if not quick:  # all fields of the compact top-256 cache, its top-k blobs replaced by non-repeating rows' blobs
        noisy = nonrepeating_topk_blob_bytes(teacher, text, max_length)
        compact = sizes["topk compact k=256"]
        noisy["bytes_per_token"] = compact["bytes_per_token"] - compact["by_dataset"]["topk_blob"] + \
            noisy["topk_blob_bytes_per_token"]
        split = {**compact["by_dataset"], "topk_blob": round(noisy["topk_blob_bytes_per_token"], 2)}
        sizes["topk compact k=256 (non-repeating rows)"] = {**compact, **noisy, "by_dataset": split}

    base_name = next(iter(sizes))
    base = sizes[base_name]["bytes_per_token"]
    ratios: dict[str, Any] = {}
    for name, stats in sizes.items():
        bpt = stats["bytes_per_token"]
        goal = GOALS.get(name) if not quick else None
        ratios[f"{name} bytes/token"] = {"value": bpt, "goal": f"<= {goal:.0f}" if goal else "",
                                         "met": (bpt <= goal) if goal else None, "baseline": "absolute"}
        ratios[f"{name} / {base_name}"] = ratio(bpt, base, "", base_name)
    return {
        "ratios": ratios,
        "sizes": sizes,
        "table": _table(sizes),
        "teacher": {k: v for k, v in teacher_stats.items()},
        "shapes": {"max_length": max_length, "vocab_size": sizes[base_name]["vocab_size"],
                   "tokens": sizes[base_name]["tokens"]},
        "dtype": "fp16 layout: ids uint32 (V > 65,536), log-probs fp16, tail fp32; compact: codec blobs; pooled fp16",
        "notes": ["bytes include every dataset (ids, offsets, text, pooled) and HDF5 overhead",
                  "lzf never reaches variable-length data (blobs, text): it compresses the array datasets only",
                  "the teacher's hidden size is 64: pooled_hidden costs P * H * 2 / L B/token (4 B at H = 1024)"],
    }


if __name__ == "__main__":
    raise SystemExit(run_standalone(run, "cache storage benchmark"))
