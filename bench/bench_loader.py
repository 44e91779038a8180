"""Loader throughput vs trainer consumption: tokens/s the training DataLoader delivers (2 workers, the trainer's own
`CacheDataset` + `DistillCollator`) on the direct path and the cross-tokenizer path (computed on the fly, and read
from the store `python -m distill.prepare_xtok` writes: its one-off cost and disk size are reported too), against
tokens/s a training step of a small student consumes, measured in the same run. Goals: loader >= 10x the trainer;
cross-tokenizer (precomputed) >= 0.7x direct.

    python -m bench.bench_loader [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from bench.common import WORK_ROOT, apply_offline_env, build_cache, ratio, resolve_device, time_fn, tiny_assets
from bench.loader_checks import run_checks
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line

SHAPES = {
    True: {"max_length": 256, "top_k": 32, "samples": 120, "batch": 8, "epochs": 2, "student": "tiny"},
    False: {"max_length": 512, "top_k": 256, "samples": 300, "batch": 8, "epochs": 2, "student": "smollm2-135m"},
}
STUDENTS = {  # (hidden, layers, heads, kv heads, intermediate, vocab rows)
    "tiny": (48, 2, 4, 2, 96, 49_152),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49_152),
}


def loader_tokens_per_s(dataset: Any, batch: int, epochs: int, pad_id: int) -> tuple[float, int]:
    """Iterate `epochs` passes of a 2-worker DataLoader; returns (student tokens/s, tokens)."""
    from torch.utils.data import DataLoader

    from distill.data.dataset import DistillCollator

    loader = DataLoader(dataset, batch_size=batch, num_workers=2, collate_fn=DistillCollator(pad_id),
                        persistent_workers=True, prefetch_factor=4)
    for _ in loader:  # warm-up pass: worker start-up, HDF5 opens, page cache
        break
    tokens = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for b in loader:
            tokens += int(b["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    del loader
    return tokens / elapsed, tokens


# The compact layouts (format 3: zstd blobs) against the fp16 top-k layout: goal >= 1.0x fp16, 2 workers.
ENCODINGS = {"topk compact": ["--encoding", "compact"],
             "sampled N=64 compact": ["--encoding", "compact", "--targets", "sampled", "--samples", "64"]}


def encoding_loaders(assets: dict[str, Any], shape: dict[str, Any], fp16_cache: Any, pad_id: int) -> dict[str, float]:
    """Direct-path loader tokens/s (2 workers, validating builder) for the fp16 top-k cache and each v2 layout in
    `ENCODINGS`, all built from the same teacher, text and windows. The fp16 cache is measured first and last
    (its mean is the baseline), so drift in machine load during the run shows as a gap between the two."""
    from cache_tools.format.reader import TeacherCacheReader
    from distill.data.dataset import CacheDataset, DirectTargets
    from distill.data.validation import SequenceValidator

    caches = {"topk fp16": fp16_cache}
    for name, flags in ENCODINGS.items():
        caches[name] = fp16_cache.parent / f"{fp16_cache.name}-{name.replace(' ', '_')}"
        if not (caches[name] / "manifest.json").is_file():
            top_k = None if "sampled" in name else shape["top_k"]
            build_cache(assets["teacher"], assets["text"], caches[name], top_k=top_k, max_length=shape["max_length"],
                        max_samples=shape["samples"], extra=flags)

    def dataset(cache: Any) -> Any:
        reader = TeacherCacheReader(cache)
        return CacheDataset(reader, np.arange(len(reader)), DirectTargets(SequenceValidator(reader)))

    def measure(cache: Any) -> float:
        return loader_tokens_per_s(dataset(cache), shape["batch"], shape["epochs"], pad_id)[0]

    first = measure(caches["topk fp16"])
    out = {name: measure(cache) for name, cache in caches.items() if name != "topk fp16"}
    out["topk fp16 (first)"], out["topk fp16 (last)"] = first, measure(caches["topk fp16"])
    out["topk fp16"] = (first + out["topk fp16 (last)"]) / 2
    for name, cache in caches.items():  # what one worker spends per token (read, decode, validate, build)
        out[f"{name} worker CPU us/token"] = worker_cpu_us_per_token(dataset(cache))
    return out


def worker_cpu_us_per_token(dataset: Any) -> float:
    """Process CPU microseconds per token of `dataset[i]` over every item, in this process (one worker's work)."""
    dataset[0]  # opens the shard
    tokens, start = 0, time.process_time()
    for i in range(len(dataset)):
        tokens += len(dataset[i]["input_ids"])
    return 1e6 * (time.process_time() - start) / tokens


def trainer_tokens_per_s(example_batch: dict[str, torch.Tensor], student: str, device: str, iters: int) -> float:
    """One optimiser step (forward, fused CE+KD, backward, AdamW) of a Llama student on a real collated batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.losses import fused_ce_kd_loss

    hidden, layers, heads, kv, inter, rows = STUDENTS[student]
    cfg = LlamaConfig(vocab_size=rows, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = {k: v.to(device) for k, v in example_batch.items()}
    flat = b["attention_mask"].reshape(-1).bool()
    K = b["topk_ids"].shape[-1]

    def step() -> None:
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        out = fused_ce_kd_loss(h.reshape(-1, hidden)[flat], model.lm_head.weight, b["labels"].reshape(-1)[flat],
                               b["topk_ids"].reshape(-1, K)[flat].clamp(min=0),
                               b["topk_logprobs"].reshape(-1, K)[flat], b["tail_logprob"].reshape(-1)[flat],
                               b["kd_mask"].reshape(-1)[flat])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    seconds = time_fn(step, device, warmup=1, iters=iters)["median_s"]
    return int(flat.sum()) / seconds


def run(quick: bool, device: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from cache_tools.format.reader import TeacherCacheReader
    from distill.data.dataset import CacheDataset, DirectTargets, DistillCollator
    from distill.data.validation import SequenceValidator
    from distill.data.xtok.pipeline import CrossTokenizerTargets, aggregate_stats
    from distill.data.xtok.prepare import prepare_store
    from examples.tiny_models import stdlib_docstrings, train_bpe_tokenizer

    shape = SHAPES[quick]
    root = WORK_ROOT / "loader"
    assets = tiny_assets(root / "assets")
    cache = root / f"cache-{shape['max_length']}-{shape['top_k']}-{shape['samples']}"
    if not (cache / "manifest.json").is_file():
        build_cache(assets["teacher"], assets["text"], cache, top_k=shape["top_k"], max_length=shape["max_length"],
                    max_samples=shape["samples"])
    teacher_tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    # Another vocabulary size and pre-tokenisation rule: every window goes through re-tokenisation + alignment.
    student_tok = train_bpe_tokenizer(stdlib_docstrings(max_docs=300), 384, split_digits=True)
    reader = TeacherCacheReader(cache)
    indices = np.arange(len(reader))
    cross = CrossTokenizerTargets(reader, teacher_tok, student_tok, use_store=False)  # validates every sequence
    direct = DirectTargets(SequenceValidator(reader))  # the trainer's direct builder validates too
    stats = aggregate_stats([cross(reader[int(i)])["stats"] for i in indices[:32]])

    # Single-process cost of the target builders alone (no loader), for the record: mean over 16 windows.
    seqs = [reader[int(i)] for i in indices[:16]]
    builders = {"direct": direct, "cross": cross, "direct, no validation": DirectTargets(),
                "cross, no validation": CrossTokenizerTargets(reader, teacher_tok, student_tok, validate=False,
                                                              use_store=False)}
    builder_ms = {name: 1e3 * time_fn(lambda b=b: [b(s) for s in seqs], "cpu", warmup=1, iters=5)["median_s"]
                  / len(seqs) for name, b in builders.items()}
    # One-off: precompute every window's cross-tokenizer targets (2 processes, like the loader's 2 workers).
    prep = prepare_store(cross, reader, workers=2, overwrite=True)
    stored = CrossTokenizerTargets(reader, teacher_tok, student_tok)
    assert stored.store is not None, "the store just written was not picked up"
    store_tokens = sum(stored.fetch(reader, int(i))["stats"]["student_tokens"] for i in indices)
    # Per window, read from the store (the cache is not read: `fetch` is what CacheDataset calls).
    builder_ms["cross, precomputed (read)"] = 1e3 * time_fn(
        lambda: [stored.fetch(reader, int(i)) for i in indices[:16]], "cpu", warmup=1, iters=5)["median_s"] / 16
    cache_bytes = sum(s.bytes for s in reader.manifest.shards)
    direct_tps, direct_tokens = loader_tokens_per_s(CacheDataset(reader, indices, direct), shape["batch"],
                                                    shape["epochs"], teacher_tok.pad_token_id)
    cross_tps, cross_tokens = loader_tokens_per_s(CacheDataset(reader, indices, cross), shape["batch"],
                                                  shape["epochs"], student_tok.pad_token_id)
    stored_tps, stored_tokens = loader_tokens_per_s(CacheDataset(reader, indices, stored), shape["batch"],
                                                    shape["epochs"], student_tok.pad_token_id)
    assert stored_tokens == cross_tokens
    # Printed before the (long, memory-hungry) trainer step, so a killed run still leaves the loader figures.
    print(f"[loader] direct {direct_tps:.0f} tokens/s, cross on the fly {cross_tps:.0f} tokens/s "
          f"({cross_tps / direct_tps:.3f}x), cross precomputed {stored_tps:.0f} tokens/s "
          f"({stored_tps / direct_tps:.3f}x); prepare {prep['seconds']:.1f} s; builder ms/window "
          f"{json.dumps(builder_ms)}", flush=True)
    checks = run_checks(cache, direct, stored, rounds=5 if quick else 7)
    print(f"[loader] integrity checks: {json.dumps({k: round(v['value'], 3) for k, v in checks['ratios'].items()})}",
          flush=True)
    by_encoding = encoding_loaders(assets, shape, cache, teacher_tok.pad_token_id)
    print(f"[loader] direct, by layout (tokens/s): {json.dumps({k: round(v) for k, v in by_encoding.items()})}",
          flush=True)
    batch = DistillCollator(student_tok.pad_token_id)([cross(reader[int(i)]) for i in indices[: shape["batch"]]])
    trainer_tps = trainer_tokens_per_s(batch, shape["student"], device, iters=2 if quick else 3)
    return {
        "ratios": {
            "cross loader/trainer": ratio(cross_tps, trainer_tps, ">= 10", f"trainer tokens/s ({shape['student']})"),
            "direct loader/trainer": ratio(direct_tps, trainer_tps, ">= 10", f"trainer tokens/s ({shape['student']})"),
            "cross loader/direct loader": ratio(cross_tps, direct_tps, "", "direct loader tokens/s"),
            "cross loader precomputed/direct loader": ratio(stored_tps, direct_tps, ">= 0.7",
                                                            "direct loader tokens/s"),
            **checks.pop("ratios"),
            **{f"{name} loader/fp16 loader": ratio(by_encoding[name], by_encoding["topk fp16"], ">= 1.0",
                                                   "fp16 top-k direct loader tokens/s") for name in ENCODINGS},
            **{f"{name} worker CPU/fp16 worker CPU": ratio(by_encoding[f"{name} worker CPU us/token"],
                                                           by_encoding["topk fp16 worker CPU us/token"], "<= 1.0",
                                                           "fp16 top-k CPU us/token, one process")
               for name in ENCODINGS},
        },
        "tokens_per_s_by_layout": by_encoding,
        "integrity_checks": checks,
        "tokens_per_s": {"cross_loader": cross_tps, "cross_loader_precomputed": stored_tps,
                         "direct_loader": direct_tps, "trainer": trainer_tps},
        "prepare_xtok": {"seconds": prep["seconds"], "windows": prep["windows"], "workers": 2,
                         "ms_per_window": 1e3 * prep["seconds"] / prep["windows"],
                         "store_bytes": prep["bytes"], "store_bytes_per_student_token": prep["bytes"] / store_tokens,
                         "cache_bytes_per_teacher_token": cache_bytes / reader.num_tokens},
        "builder_ms_per_window": builder_ms,
        "tokens": {"cross": cross_tokens, "direct": direct_tokens},
        "coverage": {k: stats[k] for k in ("aligned_fraction", "mapped_mass_fraction", "exact_mass_fraction",
                                            "truncated", "student_tokens")},
        "shapes": {**shape, "windows": len(reader), "student_dims": STUDENTS[shape["student"]],
                   "teacher_vocab": len(teacher_tok), "student_vocab": len(student_tok)},
        "dtype": "fp32",
        "notes": ["loader: torch DataLoader, 2 workers, distill.data.CacheDataset + DistillCollator; both builders "
                  "validate each sequence (distill.data.validation); cross windows capped at the cache's max_length",
                  "cross precomputed: distill.data.xtok.prepare.prepare_store (2 fork workers, timed as a one-off), "
                  "then CacheDataset reads CACHE/xtok/<key>/ through CrossTokenizerTargets.fetch (range checks on "
                  "every read window; the cache itself is not read)",
                  "integrity checks (bench/loader_checks.py): single-process passes over every window, checked vs "
                  "unchecked, alternated and compared by medians",
                  "trainer: one AdamW step with distill.losses.fused_ce_kd_loss on a collated cross-tokenizer batch",
                  "on CPU the trainer is slow, so the ratio flatters the loader; rerun with --device cuda"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = StrictArgumentParser(description="loader throughput benchmark (direct + cross-tokenizer)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parse_command_line(parser, argv)
    apply_offline_env()
    result = run(args.quick, resolve_device(args.device))
    for name, entry in result["ratios"].items():
        print(f"{name:32s} {entry['value']:10.2f}  goal {entry['goal'] or '-':8s} vs {entry['baseline']}")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "builder_ms_per_window", "prepare_xtok", "coverage")},
                     indent=1))


if __name__ == "__main__":
    main()
