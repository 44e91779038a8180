"""Storage benchmark: cache bytes per token for top-k in {32, 64, 128, 256}, with and without lzf compression, each
cache written by the real `cache_tools build-cache` over the same text with the same tiny teacher.

Ratios (all measured in this run): each size against the uncompressed k = 256 cache, lzf against none at the same k,
and each cache against storing the teacher's dense fp16 logits for the same tokens (true vocabulary x 2 bytes, the
cost the sparse cache avoids). Run alone: `python -m bench.bench_storage [--quick]`.
"""

from __future__ import annotations

import shutil
from typing import Any

from bench.common import WORK_ROOT, ratio, run_standalone, tiny_assets

SETTINGS = {
    True: dict(top_ks=(32, 256), max_samples=24, max_length=128),
    False: dict(top_ks=(32, 64, 128, 256), max_samples=300, max_length=256),
}


def build(teacher: str, text: str, out: str, *, top_k: int, max_length: int, compression: str,
          max_samples: int) -> None:
    """One `cache_tools build-cache` run, in-process through the CLI's `main` (same parser and code path as the
    console script, without paying a Python + torch start-up per size)."""
    from cache_tools.cli import main

    code = main(["build-cache", "--teacher", teacher, "--dataset", text, "--output", out, "--top-k", str(top_k),
                 "--max-length", str(max_length), "--compression", compression, "--max-samples", str(max_samples),
                 "--dtype", "fp32", "--overwrite", "--no-progress"])
    if code not in (0, None):
        raise RuntimeError(f"cache_tools build-cache exited with {code} for {out}")


def cache_stats(cache_dir: str) -> dict[str, Any]:
    from cache_tools.schema import load_manifest

    manifest = load_manifest(cache_dir)
    total = sum(s.bytes for s in manifest.shards)
    return {"bytes": total, "tokens": manifest.num_tokens, "sequences": manifest.num_sequences,
            "bytes_per_token": total / max(manifest.num_tokens, 1), "vocab_size": manifest.vocab_size,
            "id_dtype": manifest.id_dtype}


def run(quick: bool, device: str) -> dict[str, Any]:
    settings = SETTINGS[quick]
    assets = tiny_assets(WORK_ROOT / "assets")
    root = WORK_ROOT / "storage"
    sizes: dict[str, dict[str, Any]] = {}
    for top_k in settings["top_ks"]:
        for compression in ("none", "lzf"):
            out = root / f"k{top_k}-{compression}"
            build(str(assets["teacher"]), str(assets["text"]), str(out), top_k=top_k,
                  max_length=settings["max_length"], compression=compression, max_samples=settings["max_samples"])
            sizes[f"k{top_k}-{compression}"] = cache_stats(str(out))
    shutil.rmtree(root, ignore_errors=True)

    ref = sizes["k256-none"]["bytes_per_token"]
    dense = sizes["k256-none"]["vocab_size"] * 2  # fp16 logits of the true vocabulary, per token
    ratios: dict[str, Any] = {}
    for name, stats in sizes.items():
        bpt = stats["bytes_per_token"]
        ratios[f"{name} bytes/token"] = {"value": bpt, "goal": "", "met": None, "baseline": "absolute"}
        ratios[f"{name} / k256-none"] = ratio(bpt, ref, "", "uncompressed k=256")
        ratios[f"{name} / dense fp16"] = ratio(bpt, dense, "", f"dense fp16 logits ({dense} B/token)")
    for top_k in settings["top_ks"]:
        ratios[f"k{top_k} lzf/none"] = ratio(sizes[f"k{top_k}-lzf"]["bytes_per_token"],
                                             sizes[f"k{top_k}-none"]["bytes_per_token"], "", "same k, none")
    return {
        "ratios": ratios,
        "sizes": sizes,
        "shapes": {"max_length": settings["max_length"], "max_samples": settings["max_samples"],
                   "vocab_size": sizes["k256-none"]["vocab_size"]},
        "dtype": "ids uint16/uint32 by vocab, log-probs fp16, tail fp32, pooled fp16",
        "notes": ["tiny random teacher: its near-uniform log-probs compress worse than a trained teacher's",
                  "bytes include every dataset (ids, offsets, text, pooled) and HDF5 overhead"],
    }


if __name__ == "__main__":
    raise SystemExit(run_standalone(run, "cache storage benchmark"))
