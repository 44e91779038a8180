"""Quality ablation on the demo's real text: the same student (same config, initial weights, batches, steps, seed)
trained as LM-only; KD from cached top-k targets (k in {8, 32, 64, 128, 256}, tail bucket on; `_notail` variants drop
it); KD from cached SAMPLED targets (RS-KD, N in {16, 64}); online full-logit KD; with `DISTILLKIT_SRC` set
(`bench.bench_distillkit`), KD from the top-k cache passed through DistillKit's own compress -> decompress
(`kd_distillkit_*`: its README's recommended and budget configurations, as given and with `normalize_t`). Several
seeds; prints a markdown table of held-out loss (mean +- std and standard error over seeds) with each cache's
bytes/token, and writes it as JSON.

    python -m bench.ablation --demo-dir demo_out [--seeds 0 1 2] [--steps 300] [--out bench/.work/ablation.json]
    python -m bench.ablation --merge a.json b.json [--out all.json]   # one table from runs split by seed/variant

Needs a finished demo folder made with ONE shared tokenizer (`--student-vocab-size 0`): its teacher, student config
and text. The k = 256 cache and the sampled caches are built from the demo's teacher with `cache_tools build-cache`;
k = 8, 32, 64 and 128 are the k = 256 cache's first k columns with the dropped mass added to the tail (what a top-k
build would store, up to fp16 rounding). The training loop is in-process so that every variant sees bit-identical
batches; the loss is the product's `distill.losses.fused_ce_kd_loss`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import WORK_ROOT, apply_offline_env, build_cache
from bench.online_kd import full_logit_kd_loss
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line
from cache_tools.format.fsutil import atomic_write_text

TOPK_VARIANTS = [f"kd_k{k}_{t}" for k in (8, 32, 64, 128, 256) for t in ("tail", "notail")]
SAMPLED_VARIANTS = ["kd_sampled16", "kd_sampled64"]
# variant -> key of bench.bench_distillkit.DISTILLKIT_CONFIGS
DISTILLKIT_VARIANTS = {"kd_distillkit_recommended": "DistillKit recommended k=128 exact 16",
                       "kd_distillkit_recommended_norm": "DistillKit recommended k=128 exact 16 normalize_t",
                       "kd_distillkit_budget": "DistillKit budget k=50 exact 1",
                       "kd_distillkit_budget_norm": "DistillKit budget k=50 exact 1 normalize_t"}
VARIANTS = ["lm_only", *TOPK_VARIANTS, *SAMPLED_VARIANTS, *DISTILLKIT_VARIANTS, "online_full_kd"]
DEFAULT_VARIANTS = ["lm_only", "kd_k8_tail", "kd_k32_tail", "kd_k256_tail", *SAMPLED_VARIANTS, "online_full_kd"]


def batch_targets(reader: Any, indices: list[int], top_k: int | None) -> dict[str, torch.Tensor]:
    """Stack full-length cached windows -> input_ids/labels [B, L], topk_ids/topk_logprobs [B*L, k], tail [B*L].
    `top_k` keeps the first k columns of a top-k cache (None: every column, as stored; sampled caches)."""
    seqs = [reader[i] for i in indices]
    ids = torch.stack([torch.as_tensor(s.input_ids) for s in seqs])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    lp = torch.stack([torch.as_tensor(s.topk_logprobs.astype("float32")) for s in seqs]).flatten(0, 1)
    tk = torch.stack([torch.as_tensor(s.topk_ids) for s in seqs]).flatten(0, 1).long()
    tail = torch.stack([torch.as_tensor(s.tail_logprob) for s in seqs]).flatten().float()
    if top_k is not None and top_k < tk.shape[1]:
        # Mass dropped from the top-k moves into the tail, exactly as a smaller-k build would have measured it.
        dropped = lp[:, top_k:].double().exp().sum(-1)
        tail = torch.log(tail.double().exp() + dropped).clamp_min(-100.0).float()
        tk, lp = tk[:, :top_k], lp[:, :top_k].contiguous()
    return {"input_ids": ids, "labels": labels, "topk_ids": tk, "topk_logprobs": lp, "tail_logprob": tail}


def train_variant(variant: str, student_cfg: Path, readers: dict[str, Any], order: list[list[int]], teacher: Any,
                  args: argparse.Namespace, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.losses import KDConfig, fused_ce_kd_loss

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_cfg.parent)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    reader, top_k = readers["topk"], None
    if variant.startswith("kd_k"):
        top_k = int(variant.split("_k")[1].split("_")[0])
    elif variant.startswith("kd_sampled"):
        reader = readers[variant]
    kd_config = KDConfig(use_tail=not variant.endswith("_notail"), temperature=args.temperature,
                         targets="sampled" if variant in SAMPLED_VARIANTS else "topk")
    distillkit = distillkit_codec(variant, args.teacher_vocab)
    for step in range(args.steps):
        b = batch_targets(reader, order[step], top_k)
        if distillkit is not None:
            b["topk_ids"], b["topk_logprobs"], b["tail_logprob"] = distillkit(b["topk_ids"], b["topk_logprobs"])
        if variant == "online_full_kd":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=b["input_ids"]).logits
            logits = model(input_ids=b["input_ids"]).logits
            loss = full_logit_kd_loss(logits, teacher_logits, b["labels"], temperature=args.temperature)[0]
        else:
            hidden = model.model(input_ids=b["input_ids"]).last_hidden_state.flatten(0, 1)
            labels = b["labels"].flatten()
            kd_mask = torch.ones_like(labels, dtype=torch.bool)
            loss = fused_ce_kd_loss(hidden, model.get_output_embeddings().weight, labels, b["topk_ids"],
                                    b["topk_logprobs"], b["tail_logprob"], kd_mask,
                                    kd_weight=0.0 if variant == "lm_only" else 1.0, config=kd_config).loss
        optimizer_step(model, opt, sched, loss)
    return model


def distillkit_codec(variant: str, vocab: int) -> Any:
    """For a `kd_distillkit_*` variant: (ids, log-probs) of a batch -> DistillKit's encode -> decode at vocabulary
    `vocab`, as our (ids, log-probs, tail); None for every other variant. Exits with the reason when DistillKit
    cannot be imported."""
    if variant not in DISTILLKIT_VARIANTS:
        return None
    from bench.bench_distillkit import DISTILLKIT_CONFIGS, distillkit_roundtrip, load_distillkit

    compression, why = load_distillkit()
    if compression is None:
        raise SystemExit(f"--variants {variant}: {why}")
    config = DISTILLKIT_CONFIGS[DISTILLKIT_VARIANTS[variant]]
    return lambda ids, lp: distillkit_roundtrip(compression, config, ids, lp, vocab=vocab)


def optimizer_step(model: Any, opt: Any, sched: Any, loss: torch.Tensor) -> None:
    """One update as every ablation variant takes it: backward, clip to 1.0, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def batch_order(windows: list[int], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """`steps` batches of window indices: epochs of a seeded permutation (the seed also sets initial weights)."""
    gen = torch.Generator().manual_seed(seed)
    order, pool = [], []
    for _ in range(steps):
        if len(pool) < batch_size:
            pool += [windows[i] for i in torch.randperm(len(windows), generator=gen).tolist()]
        order.append(pool[:batch_size])
        pool = pool[batch_size:]
    return order


def build_caches(demo: Path, variants: list[str], max_length: int, sample_seed: int, temperature: float,
                 reuse: bool = False) -> dict[str, Path]:
    """The k = 256 cache (always: it fixes the windows and serves every top-k variant) and one cache per sampled
    variant, all from the same text and windows, through the real `cache_tools build-cache`. Samples are drawn at
    the KD `temperature` (counts/N estimate the teacher at the temperature they were drawn at). `reuse` keeps a cache
    that is already there (a run split into several commands over the same demo)."""
    text, teacher_dir = demo / "data" / "train.jsonl", demo / "teacher" / "student"
    caches = {"topk": WORK_ROOT / "ablation_cache_k256"}
    if not (reuse and (caches["topk"] / "manifest.json").is_file()):
        build_cache(teacher_dir, text, caches["topk"], top_k=256, max_length=max_length, extra=["--no-progress"])
    for variant in variants:
        if variant in SAMPLED_VARIANTS:
            n = variant.removeprefix("kd_sampled")
            caches[variant] = WORK_ROOT / f"ablation_cache_sampled{n}_T{temperature:g}"
            if reuse and (caches[variant] / "manifest.json").is_file():
                continue
            build_cache(teacher_dir, text, caches[variant], top_k=None, max_length=max_length,
                        extra=["--no-progress", "--targets", "sampled", "--samples", n, "--seed", str(sample_seed),
                               "--sample-temperature", str(temperature)])
    return caches


def bytes_per_token(cache: Path) -> float:
    from cache_tools.format.schema import load_manifest

    manifest = load_manifest(cache)
    return sum(s.bytes for s in manifest.shards) / max(1, manifest.num_tokens)


def _paired(values: list[float], reference: list[float] | None) -> tuple[float | None, float | None]:
    """Mean and standard error of the per-seed relative difference (value - reference) / reference. Paired: a seed
    fixes the initial weights and the batches for every variant, so seed-to-seed spread cancels out of the gap."""
    if not reference or len(reference) != len(values):
        return None, None
    gaps = [(v - r) / r for v, r in zip(values, reference, strict=True)]
    sem = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else 0.0
    return statistics.mean(gaps), sem


def summarise(losses: dict[str, list[float]], cache_bytes: dict[str, float]) -> list[dict[str, Any]]:
    """Per variant: mean, std and standard error of the held-out loss over seeds, and the paired gap (mean and
    standard error over seeds) to LM-only and to online KD."""
    rows = []
    for name, values in losses.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        teacher = name == "teacher"
        vs_lm, vs_lm_sem = _paired(values, None if teacher else losses.get("lm_only"))
        vs_online, vs_online_sem = _paired(values, None if teacher else losses.get("online_full_kd"))
        rows.append({"variant": name, "losses": values, "mean": mean, "std": std, "sem": std / math.sqrt(len(values)),
                     "vs_lm_only": vs_lm, "vs_lm_only_sem": vs_lm_sem, "vs_online_kd": vs_online,
                     "vs_online_kd_sem": vs_online_sem, "bytes_per_token": cache_bytes.get(name)})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def pct(x: float | None, sem: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.2f}% ({100 * sem:.2f})"

    print("\n| variant | held-out loss, mean +- std (sem) | vs LM-only, paired (sem) | vs online KD, paired (sem) "
          "| cache bytes/token |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        size = "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        print(f"| {r['variant']} | {r['mean']:.4f} +- {r['std']:.4f} ({r['sem']:.4f}) | "
              f"{pct(r['vs_lm_only'], r['vs_lm_only_sem'])} | {pct(r['vs_online_kd'], r['vs_online_kd_sem'])} | "
              f"{size} |")


def merge_runs(paths: list[Path], out: Path) -> int:
    """Runs split by variant (and seed): each variant's losses in seed order, the teacher's once, then the table."""
    losses: dict[str, dict[str, float]] = {}
    cache_bytes: dict[str, float] = {}
    for path in paths:
        record = json.loads(path.read_text())
        seeds = record["args"]["seeds"].strip("[]").split(", ")
        for row in record["rows"]:
            per_seed = ["teacher"] if row["variant"] == "teacher" else seeds
            losses.setdefault(row["variant"], {}).update(zip(per_seed, row["losses"], strict=True))
            if row["bytes_per_token"] is not None:
                cache_bytes[row["variant"]] = row["bytes_per_token"]
    def seed_order(seed: str) -> int:
        return int(seed) if seed.isdigit() else -1

    ordered = {name: [by_seed[s] for s in sorted(by_seed, key=seed_order)] for name, by_seed in losses.items()}
    rows = summarise(ordered, cache_bytes)
    print_table(rows)
    atomic_write_text(out, json.dumps({"merged": [str(p) for p in paths], "rows": rows}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature (= the sampling temperature)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sample-seed", type=int, default=0, help="--seed of the sampled caches")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=WORK_ROOT / "ablation.json")
    parser.add_argument("--reuse-caches", action="store_true",
                        help="keep the caches an earlier run over the same demo built")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="print one table from earlier runs' JSON files (same seeds per variant) and exit")
    args = parse_command_line(parser, argv)
    if args.merge:
        return merge_runs(args.merge, args.out)
    apply_offline_env()
    from transformers import AutoModelForCausalLM

    from cache_tools.format.reader import TeacherCacheReader
    from distill.evaluate import evaluate_windows as evaluate_model
    from examples.demo.evaluation import held_out_windows

    demo = args.demo_dir.resolve()
    teacher_dir, student_cfg = demo / "teacher" / "student", demo / "configs" / "student" / "config.json"
    for needed in (teacher_dir / "config.json", student_cfg, demo / "data" / "train.jsonl"):
        if not needed.is_file():
            raise SystemExit(f"--demo-dir {demo}: {needed} missing; run `python -m examples.demo --out {demo}` first")
    if (demo / "student_tokenizer").exists():
        raise SystemExit(f"--demo-dir {demo}: made with --student-vocab-size (two tokenizers); the ablation compares "
                         "losses on the teacher's tokens, so run it on a demo with --student-vocab-size 0")
    for variant in args.variants:
        distillkit_codec(variant, 2)  # a missing DistillKit stops the run before any cache is built
    max_length = json.loads((demo / "report.json").read_text())["info"]["settings"]["max_length"]
    caches = build_caches(demo, args.variants, max_length, args.sample_seed, args.temperature, args.reuse_caches)
    readers = {name: TeacherCacheReader(path) for name, path in caches.items()}
    cache_bytes = {v: bytes_per_token(caches[v]) for v in args.variants if v in caches}
    cache_bytes.update({v: bytes_per_token(caches["topk"]) for v in args.variants if v.startswith("kd_k")})
    full = [i for i in range(len(readers["topk"])) if readers["topk"][i].length == max_length]  # equal lengths
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    args.teacher_vocab = teacher.config.vocab_size
    windows = held_out_windows(demo / "tokenizer", demo / "data" / "eval.jsonl", max_length, args.eval_windows)
    losses: dict[str, list[float]] = {"teacher": [evaluate_model(teacher, windows)[0]]}
    for seed in args.seeds:
        order = batch_order(full, args.steps, args.batch_size, seed)
        for variant in args.variants:
            t0 = time.perf_counter()
            model = train_variant(variant, student_cfg, readers, order, teacher, args, seed)
            losses.setdefault(variant, []).append(evaluate_model(model, windows)[0])
            print(f"[ablation] seed {seed} {variant}: held-out loss {losses[variant][-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = summarise(losses, cache_bytes)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                            "train_sequences": len(full)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
