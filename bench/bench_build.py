"""Cache build vs the teacher alone: wall time of `build_cache`'s build loop (tokenise + pack, forward, chunked top-k
+ tail + pooling, device->host copy, HDF5 writes on the background thread) over the time of plain teacher forwards
(`model(input_ids, attention_mask)`, full logits) over the same windows in the same batches, measured in the same run.
Goal: ratio <= 1.10, i.e. the build is teacher-bound.

The full run adds a teacher with Qwen3-0.6B's shape (random weights, config built locally, the real Qwen3 tokenizer
from ../shared; skipped with a note when ../shared is absent), built with the top-k pre-filter off (torch.topk, as
before) and on, plus the chunked head step alone (matmul + top-k + tail) with and without the pre-filter.

    python -m bench.bench_build [--quick] [--device cpu|cuda] [--qwen-only]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO_ROOT, WORK_ROOT, apply_offline_env, device_info, ratio, resolve_device, sync, tiny_assets
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line

SHAPES = {  # quick: CI smoke; full: a wider teacher and the production top_k / window length
    True: {"vocab": 512, "teacher_hidden": 64, "teacher_layers": 2, "docs": 150, "max_length": 256, "top_k": 32,
           "batch": 8},
    False: {"vocab": 4096, "teacher_hidden": 256, "teacher_layers": 2, "docs": 300, "max_length": 512, "top_k": 256,
            "batch": 8},
}
# The full run also measures a deeper teacher: the 2-layer one is head-heavy (its LM head is ~40% of a forward),
# real teachers are not (Qwen3-0.6B: 28 layers, head ~26% of the FLOPs), and the build's extra work (top-k, tail)
# scales with the head, not the body. Reported beside the main ratio, never instead of it.
DEEP_LAYERS = 8
SHARED = REPO_ROOT.parent / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen3"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
# Qwen3-0.6B's shape; 2 batches of 2 x 128 tokens only: a 0.6B forward runs at ~1 s per 10 tokens on the shared
# 2-core CPU, and the build's extra work is per token (head), not per window length.
QWEN_SHAPE = {"layers": 28, "hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8, "head_dim": 128,
              "head_rows": 151_936, "max_length": 128, "batch": 2, "windows": 4, "top_k": 256}


def _tiny(shape: dict) -> tuple[Path, Path]:
    assets = tiny_assets(WORK_ROOT / "assets", vocab=shape["vocab"], teacher_hidden=shape["teacher_hidden"],
                         docs=shape["docs"], teacher_layers=shape["teacher_layers"])
    return assets["teacher"], assets["text"]


def _teacher_forward_s(teacher_dir, text, shape: dict, device: str, dtype: torch.dtype) -> tuple[float, int]:
    """Seconds of plain teacher forwards over the build's windows and batches (tokenised beforehand, not timed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache_tools.format.text_data import load_documents, pack_windows

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    windows = list(pack_windows(tok, load_documents(str(text)), shape["max_length"]))
    batches = []
    for lo in range(0, len(windows), shape["batch"]):
        group = windows[lo : lo + shape["batch"]]
        longest = max(len(w.input_ids) for w in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, w in enumerate(group):
            ids[row, : len(w.input_ids)] = torch.from_numpy(w.input_ids)
            mask[row, : len(w.input_ids)] = 1
        batches.append((ids.to(device), mask.to(device)))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        model(*batches[0])  # warm-up: first-call allocations and kernel selection
        sync(device)
        start = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask).logits.sum()
        sync(device)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    del model
    return time.perf_counter() - start, tokens


def _measure(teacher_dir, text, shape: dict, device: str, prefilter: tuple[bool, ...] = (True,)) -> dict[str, Any]:
    """Build-loop seconds (once per top-k pre-filter setting) vs plain teacher forwards (best of two, one before and
    one after the builds)."""
    from cache_tools import head
    from cache_tools.builder import BuildOptions, build_cache

    dtype_name = "fp32" if device == "cpu" else "bf16"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    out = WORK_ROOT / "build_cache"
    shutil.rmtree(out, ignore_errors=True)
    forward_a, tokens = _teacher_forward_s(teacher_dir, text, shape, device, dtype)
    builds = {}
    try:
        for setting in prefilter:
            head.TOPK_PREFILTER = setting
            builds[setting] = build_cache(BuildOptions(
                teacher=str(teacher_dir), dataset=str(text), output=str(out), max_length=shape["max_length"],
                top_k=shape["top_k"], batch_size=shape["batch"], dtype=dtype_name, device=device, shard_size=64,
                progress=False, overwrite=True,
            ))
            assert builds[setting]["num_tokens"] == tokens, (builds[setting]["num_tokens"], tokens)
    finally:
        head.TOPK_PREFILTER = True
    forward_b, _ = _teacher_forward_s(teacher_dir, text, shape, device, dtype)
    forward_s = min(forward_a, forward_b)  # the faster baseline: the ratio errs against the builder
    shutil.rmtree(out, ignore_errors=True)
    return {"dtype": dtype_name, "tokens": tokens, "forward_s": [round(forward_a, 3), round(forward_b, 3)],
            "forward_best_s": forward_s, "stats": builds[prefilter[-1]], "builds": builds}


def _qwen_shaped_teacher(root: Path) -> Path:
    """A random-weight teacher with Qwen3-0.6B's shape over the real Qwen3 tokenizer, saved once under `root`. The
    config is built here (nothing from the hub); timings do not depend on the weights' values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    path = root / "qwen3-0.6b-shape"
    if (path / "ready").exists():
        return path
    q = QWEN_SHAPE
    config = Qwen3Config(vocab_size=q["head_rows"], hidden_size=q["hidden"], intermediate_size=q["intermediate"],
                         num_hidden_layers=q["layers"], num_attention_heads=q["heads"],
                         num_key_value_heads=q["kv_heads"], head_dim=q["head_dim"], max_position_embeddings=40_960,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(QWEN_TOKENIZER).save_pretrained(path)
    (path / "ready").touch()
    return path


def _qwen_text(root: Path, tokenizer_dir: Path, tokens: int) -> Path:
    """One document of tinyshakespeare cut to just under `tokens` tokens, so packing gives exactly
    ceil(tokens / max_length) windows (all full but the last)."""
    from transformers import AutoTokenizer

    text = " ".join(SHAKESPEARE.read_text(encoding="utf-8").split())[: tokens * 8]
    enc = AutoTokenizer.from_pretrained(tokenizer_dir)(text, return_offsets_mapping=True)
    cut = enc["offset_mapping"][tokens - 16][0]  # a margin: re-tokenising at the cut may merge differently
    path = root / f"shakespeare-{tokens}.txt"
    path.write_text(text[:cut].strip() + "\n", encoding="utf-8")
    return path


def _topk_step(vocab: int, top_k: int, device: str, reps: int = 5) -> dict[str, float]:
    """The head on one builder chunk of rows at the Qwen3 shape: its matmul once, then top-(k+1) of the logits with
    torch.topk and with the block-maxima pre-filter, interleaved, best of `reps` each (the machine is shared)."""
    from cache_tools import head

    rows = max(1, head._CHUNK_LOGIT_BYTES // (4 * vocab))  # the builder's chunk at this vocabulary
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(QWEN_SHAPE["hidden"], QWEN_SHAPE["head_rows"], bias=False).to(device)
    hidden = torch.randn(rows, QWEN_SHAPE["hidden"], device=device)
    best = {"matmul": float("inf"), "torch_topk": float("inf"), "prefilter": float("inf")}
    with torch.inference_mode():
        for _ in range(2):
            best["matmul"] = min(best["matmul"], _timed(lambda: lm_head(hidden), device))
        logits = lm_head(hidden)[:, :vocab]
        for _ in range(reps):
            for name, setting in (("torch_topk", False), ("prefilter", True)):
                head.TOPK_PREFILTER = setting
                best[name] = min(best[name], _timed(lambda: head.row_topk(logits, top_k + 1), device))
        head.TOPK_PREFILTER = True
    return {"rows": rows, **{f"{name}_s": round(value, 4) for name, value in best.items()}}


def _qwen_run(device: str) -> dict[str, Any]:
    """The Qwen3-0.6B-shaped build (pre-filter off, then on) and the head step alone."""
    if not (QWEN_TOKENIZER.is_dir() and SHAKESPEARE.is_file()):
        return {"skipped": f"{QWEN_TOKENIZER} or {SHAKESPEARE} absent (../shared is not there)"}
    root = WORK_ROOT / "assets"
    teacher_dir = _qwen_shaped_teacher(root)
    text = _qwen_text(root, teacher_dir, QWEN_SHAPE["windows"] * QWEN_SHAPE["max_length"])
    shape = {"max_length": QWEN_SHAPE["max_length"], "batch": QWEN_SHAPE["batch"], "top_k": QWEN_SHAPE["top_k"]}
    run = _measure(teacher_dir, text, shape, device, prefilter=(False, True))
    plain, fast = run["builds"][False], run["builds"][True]
    step = _topk_step(151_669, QWEN_SHAPE["top_k"], device)  # the tokenizer's true vocabulary; the rest is padding
    return {
        "shape": QWEN_SHAPE, "dtype": run["dtype"], "tokens": run["tokens"], "forward_s": run["forward_s"],
        "build_s": {"torch_topk": round(plain["build_s"], 3), "prefilter": round(fast["build_s"], 3)},
        "build_teacher_s": {"torch_topk": round(plain["teacher_s"], 3), "prefilter": round(fast["teacher_s"], 3)},
        "writer_wait_s": {"torch_topk": round(plain["writer_wait_s"], 3), "prefilter": round(fast["writer_wait_s"], 3)},
        "head_chunk": step,
        "ratios": {
            "build_over_forward (Qwen3-0.6B shape)": ratio(fast["build_s"], run["forward_best_s"], "<= 1.10",
                                                           "teacher forward only"),
            "build_over_forward (Qwen3-0.6B shape, torch.topk: before)": ratio(
                plain["build_s"], run["forward_best_s"], "", "teacher forward only (informative)"),
            "top-k: prefilter / torch.topk (Qwen3 head chunk)": ratio(step["prefilter_s"], step["torch_topk_s"], "",
                                                                      "torch.topk"),
            "top-k over the chunk's head matmul (torch.topk)": ratio(step["torch_topk_s"], step["matmul_s"], "",
                                                                     "lm_head matmul"),
            "top-k over the chunk's head matmul (prefilter)": ratio(step["prefilter_s"], step["matmul_s"], "",
                                                                    "lm_head matmul"),
        },
    }


def _timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run(quick: bool, device: str, qwen_only: bool = False) -> dict[str, Any]:
    apply_offline_env()
    if qwen_only:
        return {"device_info": device_info(device), "qwen3_0_6b_shape": (qwen := _qwen_run(device)),
                "ratios": qwen.get("ratios", {})}
    shape = SHAPES[quick]
    main_run = _measure(*_tiny(shape), shape, device)
    stats, forward_s, tokens = main_run["stats"], main_run["forward_best_s"], main_run["tokens"]
    ratios = {"build_over_forward": ratio(stats["build_s"], forward_s, "<= 1.10", "teacher forward only")}
    result: dict[str, Any] = {}
    if not quick:
        deep_shape = {**shape, "teacher_layers": DEEP_LAYERS}
        deep = _measure(*_tiny(deep_shape), deep_shape, device)
        ratios[f"build_over_forward ({DEEP_LAYERS}-layer teacher)"] = ratio(
            deep["stats"]["build_s"], deep["forward_best_s"], "", "teacher forward only (informative)")
        result["deep_teacher"] = {"shape": deep_shape, "forward_s": deep["forward_s"],
                                  "build_s": round(deep["stats"]["build_s"], 3)}
        result["qwen3_0_6b_shape"] = qwen = _qwen_run(device)  # measured last: the slowest part
        ratios.update(qwen.get("ratios", {}))
    return {
        "ratios": ratios,
        "shapes": shape,
        "dtype": main_run["dtype"],
        "device_info": device_info(device),
        "tokens": tokens,
        "forward_s": main_run["forward_s"],
        "build_s": round(stats["build_s"], 3),
        "build_wall_incl_load_s": round(stats["wall_s"], 3),
        "build_teacher_s": round(stats["teacher_s"], 3),
        "writer_wait_s": round(stats["writer_wait_s"], 3),
        "bytes_per_token": round(stats["bytes_per_token"], 1),
        "build_tokens_per_s": round(tokens / stats["build_s"], 1),
        **result,
        "notes": ["build_s = build loop after model load (includes tokenisation); forward_s = model(...) over "
                  "pre-tokenised batches; writer_wait_s = time the forward loop was blocked by the writer thread"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--qwen-only", action="store_true", help="only the Qwen3-0.6B-shaped teacher")
    args = parse_command_line(parser, argv)
    result = run(args.quick, resolve_device(args.device), qwen_only=args.qwen_only)
    print(json.dumps(result, indent=2, default=str))
    for name, r in result["ratios"].items():
        print(f"{name}: {r['value']:.3f} (goal {r['goal'] or '-'}, met={r['met']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
