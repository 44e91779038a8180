"""Quality ablation on the demo's real text: the same student (same config, initial weights, batches, steps, seed)
trained as LM-only; cached KD with k in {8, 32, 256}, each with and without the tail bucket; online full-logit KD.
Prints a markdown table of held-out loss / perplexity (pasted into docs/RESULTS.md) and writes it as JSON.

    python -m bench.ablation --demo-dir demo_out [--steps 300] [--out bench/.work/ablation.json]

Needs a finished demo folder (its tokenizer, teacher, student config and text). The k = 256 cache is built from the
demo's teacher with `cache_tools build-cache`; k = 8 and 32 are its first k columns with the tail re-summed
(log(exp(tail_256) + sum of the dropped probabilities)), which is what a top-k build would store, up to fp16
rounding. The training loop is in-process so that all eight runs see bit-identical batches; the loss is the
product's `distill.losses.fused_ce_kd_loss`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import WORK_ROOT, apply_offline_env, build_cache
from bench.online_kd import full_logit_kd_loss
from cache_tools.schema import atomic_write_text

VARIANTS = ["lm_only", *[f"kd_k{k}_{t}" for k in (8, 32, 256) for t in ("tail", "notail")], "online_full_kd"]


def batch_targets(reader: Any, indices: list[int], top_k: int) -> dict[str, torch.Tensor]:
    """Stack full-length cached windows -> input_ids/labels [B, L], topk_ids/topk_logprobs [B*L, k], tail [B*L]."""
    seqs = [reader[i] for i in indices]
    ids = torch.stack([torch.as_tensor(s.input_ids) for s in seqs])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    lp = torch.stack([torch.as_tensor(s.topk_logprobs.astype("float32")) for s in seqs]).flatten(0, 1)
    tk = torch.stack([torch.as_tensor(s.topk_ids) for s in seqs]).flatten(0, 1)
    tail = torch.stack([torch.as_tensor(s.tail_logprob) for s in seqs]).flatten().double()
    # Mass dropped from the top-k moves into the tail, exactly as a smaller-k build would have measured it.
    dropped = lp[:, top_k:].double().exp().sum(-1)
    tail = torch.log(tail.exp() + dropped).clamp_min(-100.0).float()
    return {"input_ids": ids, "labels": labels, "topk_ids": tk[:, :top_k].long(),
            "topk_logprobs": lp[:, :top_k].contiguous(), "tail_logprob": tail}


def train_variant(variant: str, student_cfg: Path, reader: Any, order: list[list[int]], teacher: Any,
                  args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.losses import KDConfig, fused_ce_kd_loss

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student_cfg.parent)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    top_k = int(variant.split("_k")[1].split("_")[0]) if variant.startswith("kd_k") else reader.top_k
    kd_config = KDConfig(use_tail=variant.endswith("_tail"), temperature=args.temperature)
    for step in range(args.steps):
        b = batch_targets(reader, order[step], top_k)
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=WORK_ROOT / "ablation.json")
    args = parser.parse_args(argv)
    apply_offline_env()
    from transformers import AutoModelForCausalLM

    from cache_tools.reader import TeacherCacheReader
    from distill.evaluate import evaluate_windows as evaluate_model
    from examples.demo.evaluation import held_out_windows

    demo = args.demo_dir.resolve()
    teacher_dir, student_cfg = demo / "teacher" / "student", demo / "configs" / "student" / "config.json"
    for needed in (teacher_dir / "config.json", student_cfg, demo / "data" / "train.jsonl"):
        if not needed.is_file():
            raise SystemExit(f"--demo-dir {demo}: {needed} missing; run `python -m examples.demo --out {demo}` first")
    if (demo / "student_tokenizer").exists():
        raise SystemExit(f"--demo-dir {demo}: made with --student-vocab-size (two tokenizers); the ablation compares "
                         "losses on the teacher's tokens, so run it on a demo with the shared tokenizer")
    max_length = json.loads((demo / "report.json").read_text())["info"]["settings"]["max_length"]
    cache = WORK_ROOT / "ablation_cache_k256"
    build_cache(teacher_dir, demo / "data" / "train.jsonl", cache, top_k=256, max_length=max_length,
                extra=["--no-progress"])
    reader = TeacherCacheReader(cache)
    full = [i for i in range(len(reader)) if reader[i].length == max_length]  # equal-length batches
    gen = torch.Generator().manual_seed(args.seed)
    order, pool = [], []
    for _ in range(args.steps):
        if len(pool) < args.batch_size:
            pool += [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        order.append(pool[: args.batch_size])
        pool = pool[args.batch_size :]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    windows = held_out_windows(demo / "tokenizer", demo / "data" / "eval.jsonl", max_length, args.eval_windows)
    teacher_loss, _ = evaluate_model(teacher, windows)
    rows: dict[str, Any] = {"teacher": {"val_loss": teacher_loss, "perplexity": math.exp(teacher_loss)}}
    for variant in args.variants:
        t0 = time.perf_counter()
        model = train_variant(variant, student_cfg, reader, order, teacher, args)
        loss, _ = evaluate_model(model, windows)
        rows[variant] = {"val_loss": loss, "perplexity": math.exp(loss), "train_s": time.perf_counter() - t0}
        print(f"[ablation] {variant}: held-out loss {loss:.4f} ({rows[variant]['train_s']:.0f} s)", flush=True)
    base = rows.get("lm_only", {}).get("val_loss")
    print("\n| variant | held-out loss | perplexity | vs LM-only |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        rel = f"{100 * (r['val_loss'] - base) / base:+.1f}%" if base and name != "teacher" else "-"
        print(f"| {name} | {r['val_loss']:.4f} | {r['perplexity']:.2f} | {rel} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "train_sequences": len(full)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
