"""Multi-teacher ablation on real text (the standard library's docstrings): the same student (config, initial weights,
batches, steps, seed) trained LM-only, from teacher 1's cache, from teacher 2's cache, and from both (equal weights),
over several seeds, paired. The two teachers are genuinely different: another architecture, size and seed, each
pretrained LM-only on the same training text; their caches are built by `cache_tools build-cache` on the same text
and windows and checked to cover the same windows. Prints a markdown table of held-out loss (mean +- std) and each
variant's paired gap to LM-only and to the better single teacher; writes JSON.

    python -m bench.ablation_multi [--seeds 0 1 2] [--steps 200] [--teacher-steps 400] [--out FILE]

CPU-sized on purpose (tiny models, a 1,024-token vocabulary): the point is the comparison, measured in one run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.ablation import _paired, batch_order, optimizer_step
from bench.common import WORK_ROOT, apply_offline_env, build_cache
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line
from cache_tools.format.fsutil import atomic_write_text

VARIANTS = {"lm_only": [0.0, 0.0], "teacher1": [1.0, 0.0], "teacher2": [0.0, 1.0], "both": [0.5, 0.5]}
MAX_LENGTH = 128


def prepare_text(root: Path, docs: int) -> tuple[Path, Path, Path]:
    """Train / held-out text files (one document per line, the last 10% held out) and a BPE tokenizer."""
    from examples.tiny_models import stdlib_docstrings, train_bpe_tokenizer

    corpus = [d.replace("\n", " ") for d in stdlib_docstrings(max_docs=docs)]
    cut = int(0.9 * len(corpus))
    train, held = root / "train.txt", root / "eval.txt"
    train.write_text("\n".join(corpus[:cut]) + "\n", encoding="utf-8")
    held.write_text("\n".join(corpus[cut:]) + "\n", encoding="utf-8")
    train_bpe_tokenizer(corpus[:cut], 1024).save_pretrained(root / "tokenizer")
    return train, held, root / "tokenizer"


def windows(tokenizer_dir: Path, text: Path, limit: int | None = None) -> torch.Tensor:
    """Full windows of MAX_LENGTH tokens of a text file, as the cache builder packs them -> [W, MAX_LENGTH]."""
    from transformers import AutoTokenizer

    from cache_tools.format.text_data import load_documents, pack_windows

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [torch.as_tensor(w.input_ids, dtype=torch.long) for w in pack_windows(tok, load_documents(str(text)),
                                                                                MAX_LENGTH)
            if len(w.input_ids) == MAX_LENGTH]
    return torch.stack(rows[:limit] if limit else rows)


def pretrain_teacher(config: Any, train: torch.Tensor, tokenizer_dir: Path, out: Path, steps: int, seed: int) -> Path:
    """LM-only pretraining of a teacher (AdamW, cosine), saved with its tokenizer for `build-cache`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(model, opt, sched, loss)
    model.eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def batch(readers: list[Any], indices: list[int]) -> dict[str, Any]:
    """input_ids / labels [B, L] and each teacher's flattened targets for the same windows."""
    from distill.losses import TeacherTargets

    seqs = [[r[i] for i in indices] for r in readers]
    ids = torch.stack([torch.as_tensor(s.input_ids) for s in seqs[0]])
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    teachers = []
    for per_teacher in seqs:
        tk = torch.cat([torch.as_tensor(s.topk_ids) for s in per_teacher]).long()
        lp = torch.cat([torch.as_tensor(s.topk_logprobs) for s in per_teacher]).float()
        tail = torch.cat([torch.as_tensor(s.tail_logprob) for s in per_teacher]).float()
        teachers.append(TeacherTargets(tk, lp, tail, torch.ones(tk.shape[0], dtype=torch.bool)))
    return {"input_ids": ids, "labels": labels.flatten(), "teachers": teachers}


def train_student(variant: str, student_config: Any, readers: list[Any], order: list[list[int]], steps: int,
                  seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from distill.losses import KDConfig, fused_ce_kd_loss, fused_multi_ce_kd_loss

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(student_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    weights, cfg = VARIANTS[variant], KDConfig()
    for step in range(steps):
        b = batch(readers, order[step])
        hidden = model.model(input_ids=b["input_ids"]).last_hidden_state.flatten(0, 1)
        head = model.get_output_embeddings().weight
        if variant == "both":
            loss = fused_multi_ce_kd_loss(hidden, head, b["labels"], b["teachers"], teacher_weights=weights,
                                          config=cfg).loss
        else:  # one teacher (or none): the single-teacher call, as a one-cache run makes it
            t = b["teachers"][1 if variant == "teacher2" else 0]
            loss = fused_ce_kd_loss(hidden, head, b["labels"], t.topk_ids, t.topk_logprobs, t.tail_logprob,
                                    t.kd_mask, kd_weight=0.0 if variant == "lm_only" else 1.0, config=cfg).loss
        optimizer_step(model, opt, sched, loss)
    return model


def summarise(losses: dict[str, list[float]]) -> list[dict[str, Any]]:
    singles = [v for v in ("teacher1", "teacher2") if v in losses]
    better = min(singles, key=lambda v: statistics.mean(losses[v])) if singles else None
    rows = []
    for name, values in losses.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        teacher = name.startswith("teacher model")
        vs_lm, vs_lm_sem = _paired(values, None if teacher else losses.get("lm_only"))
        vs_best, vs_best_sem = _paired(values, None if teacher or not better else losses[better])
        rows.append({"variant": name, "losses": values, "mean": statistics.mean(values), "std": std,
                     "vs_lm_only": vs_lm, "vs_lm_only_sem": vs_lm_sem, "vs_better_single": vs_best,
                     "vs_better_single_sem": vs_best_sem, "better_single": better})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def pct(x: float | None, sem: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.2f}% ({100 * sem:.2f})"

    better = rows[0]["better_single"]
    print(f"\n| variant | held-out loss, mean +- std | vs LM-only, paired (sem) | vs {better}, paired (sem) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['mean']:.4f} +- {r['std']:.4f} | {pct(r['vs_lm_only'], r['vs_lm_only_sem'])} | "
              f"{pct(r['vs_better_single'], r['vs_better_single_sem'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="python -m bench.ablation_multi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="student steps")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--docs", type=int, default=1500, help="docstrings used (train 90%, held out 10%)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=WORK_ROOT / "ablation_multi.json")
    args = parse_command_line(parser, argv)
    apply_offline_env()
    from transformers import AutoTokenizer

    from cache_tools.format.reader import TeacherCacheReader
    from cache_tools.format.windows import check_same_windows
    from distill.evaluate import evaluate_windows
    from examples.tiny_models import tiny_llama_config, tiny_qwen3_moe_config

    root = WORK_ROOT / f"ablation_multi_d{args.docs}_t{args.teacher_steps}"
    root.mkdir(parents=True, exist_ok=True)
    train_text, eval_text, tok_dir = prepare_text(root, args.docs)
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    train = windows(tok_dir, train_text)
    held = windows(tok_dir, eval_text, args.eval_windows)
    t0 = time.perf_counter()
    teachers = [
        pretrain_teacher(tiny_qwen3_moe_config(vocab, hidden_size=128, layers=2), train, tok_dir, root / "teacher1",
                         args.teacher_steps, seed=11),
        pretrain_teacher(tiny_llama_config(vocab, hidden_size=160, layers=3), train, tok_dir, root / "teacher2",
                         args.teacher_steps, seed=22),
    ]
    print(f"[ablation_multi] teachers pretrained ({time.perf_counter() - t0:.0f} s)", flush=True)
    caches = []
    for i, teacher in enumerate(teachers, start=1):
        cache = root / f"cache{i}"
        if not (cache / "manifest.json").is_file():
            build_cache(teacher, train_text, cache, top_k=64, max_length=MAX_LENGTH, extra=["--no-progress"])
        caches.append(cache)
    readers = [TeacherCacheReader(c) for c in caches]
    check_same_windows([(c, r.manifest) for c, r in zip(caches, readers, strict=True)])
    from transformers import AutoModelForCausalLM

    losses: dict[str, list[float]] = {}
    for i, teacher in enumerate(teachers, start=1):
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        losses[f"teacher model {i}"] = [evaluate_windows(model, held)[0]]
    full = [i for i in range(len(readers[0])) if readers[0][i].length == MAX_LENGTH]
    student_config = tiny_llama_config(vocab, hidden_size=64, layers=2)
    for seed in args.seeds:
        order = batch_order(full, args.steps, 16, seed)
        for variant in VARIANTS:
            t1 = time.perf_counter()
            model = train_student(variant, student_config, readers, order, args.steps, seed)
            losses.setdefault(variant, []).append(evaluate_windows(model, held)[0])
            print(f"[ablation_multi] seed {seed} {variant}: held-out loss {losses[variant][-1]:.4f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)
    rows = summarise(losses)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                            "train_windows": len(full), "held_out_windows": len(held)}, indent=2)
                      + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
