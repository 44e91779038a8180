"""Multi-teacher ablation on real text (the standard library's docstrings): the same student (config, initial weights,
batches, steps, seed) trained LM-only, from teacher 1's cache, from teacher 2's cache, and from both (equal weights),
over several seeds, paired. The two teachers are genuinely different: another architecture, size and seed, each
pretrained LM-only on the same training text; their caches are built by `cache_tools build-cache` on the same text
and windows and checked to cover the same windows. Prints a markdown table of held-out loss (mean +- std) and each
variant's paired gap to LM-only and to the better single teacher; writes JSON.

    python -m bench.ablation_multi [--seeds 0 1 2] [--steps 200] [--teacher-steps 400] [--out FILE]

CPU-sized on purpose (tiny models, a 1,024-token vocabulary): the point is the comparison, measured in one run.

With `--demo DIR` (a finished `python -m examples.demo --out DIR`), teacher 1 is the demo's trained teacher and the
text, held-out text and tokenizer are the demo's (copied into --work); only teacher 2 (a dense Llama, its size and
seed from --teacher2-*) is trained here, on the same windows. `--stage` runs one step at a time (teachers, caches,
students for --seeds, report), each resuming from --work, so a long run splits into short commands.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.ablation import _paired, batch_order, optimizer_step
from bench.common import WORK_ROOT, apply_offline_env, build_cache
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line
from cache_tools.format.errors import ConfigError
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
    t0 = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(model, opt, sched, loss)
        if (step + 1) % 100 == 0:
            print(f"[ablation_multi] {out.name} step {step + 1}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
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
                  seed: int, both_weights: list[float] | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from distill.losses import KDConfig, fused_ce_kd_loss, fused_multi_ce_kd_loss

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(student_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    weights, cfg = (both_weights if variant == "both" and both_weights else VARIANTS[variant]), KDConfig()
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


STAGES = ("teachers", "caches", "students", "report")


def prepare_demo(demo: Path, root: Path, *, teacher: bool) -> tuple[Path, Path, Path]:
    """Copies of a demo's text and tokenizer and, with `teacher`, of its trained teacher (saved once the demo's
    teacher stage has finished; the demo folder is never written to)."""
    needed = [demo / "data/train.jsonl", demo / "data/eval.jsonl", demo / "tokenizer/tokenizer.json"]
    if teacher:
        needed += [demo / "teacher/student/config.json", demo / "teacher/student/model.safetensors"]
    if not all(path.is_file() for path in needed):
        raise ConfigError(f"--demo {demo}: {next(p for p in needed if not p.is_file())} missing; run `python -m "
                          "examples.demo --out DIR` first")
    for name in ("data/train.jsonl", "data/eval.jsonl"):
        if not (root / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(demo / name, root / name)
    copies = [(demo / "tokenizer", root / "tokenizer")] + [(demo / "teacher/student", root / "teacher1")] * teacher
    for src, dst in copies:
        if not dst.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    if teacher:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(root / "teacher1")  # build-cache reads it
    return root / "data/train.jsonl", root / "data/eval.jsonl", root / "tokenizer"


def result_name(seed: int, variant: str, args: Any) -> str:
    """The result file of one student; `both` with other weights than 0.5, 0.5 is another student."""
    weights = "" if variant != "both" or args.both_weights == "0.5,0.5" else f"_w{args.both_weights.replace(',', '-')}"
    return f"seed{seed}_{variant}{weights}_s{args.steps}.json"


def _saved(path: Path) -> float | None:
    return json.loads(path.read_text())["loss"] if path.is_file() else None


def _save(path: Path, loss: float, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"loss": loss, **extra}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(prog="python -m bench.ablation_multi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="student steps")
    parser.add_argument("--teacher-steps", type=int, default=400, help="pretraining steps of each teacher trained here")
    parser.add_argument("--docs", type=int, default=1500, help="docstrings used (train 90%%, held out 10%%)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--demo", type=Path, default=None,
                        help="a finished demo folder: teacher 1 is its trained teacher, the text its data/ "
                             "(train.jsonl, eval.jsonl), the tokenizer its teacher tokenizer (shared by the student); "
                             "only teacher 2 is trained here")
    parser.add_argument("--teacher2-hidden", type=int, default=160)
    parser.add_argument("--teacher2-layers", type=int, default=3)
    parser.add_argument("--teacher2-seed", type=int, default=22)
    parser.add_argument("--top-k", type=int, default=64, help="top-k of both caches")
    parser.add_argument("--both-weights", default="0.5,0.5", help="teacher weights of the `both` student")
    parser.add_argument("--work", type=Path, default=None, help="working folder (kept between stages)")
    parser.add_argument("--stage", choices=("all", *STAGES), default="all",
                        help="run one stage (each resumes from what the earlier ones left in --work): teachers, caches "
                             "(+ the teachers' held-out loss), students (the 4 variants for --seeds), report")
    parser.add_argument("--out", type=Path, default=WORK_ROOT / "ablation_multi.json")
    args = parse_command_line(parser, argv)
    apply_offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache_tools.format.reader import TeacherCacheReader
    from cache_tools.format.windows import check_same_windows
    from distill.evaluate import evaluate_windows
    from examples.tiny_models import tiny_llama_config, tiny_qwen3_moe_config

    stages = STAGES if args.stage == "all" else (args.stage,)
    name = f"demo_t{args.teacher_steps}" if args.demo else f"d{args.docs}_t{args.teacher_steps}"
    root = args.work or WORK_ROOT / f"ablation_multi_{name}"
    root.mkdir(parents=True, exist_ok=True)
    if args.demo:
        train_text, eval_text, tok_dir = prepare_demo(args.demo, root, teacher=stages != ("teachers",))
    else:
        train_text, eval_text, tok_dir = prepare_text(root, args.docs)
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    held = windows(tok_dir, eval_text, args.eval_windows)
    teachers = [root / "teacher1", root / "teacher2"]
    results = root / "results"
    if "teachers" in stages:
        t0 = time.perf_counter()
        train = windows(tok_dir, train_text)
        if not args.demo:
            pretrain_teacher(tiny_qwen3_moe_config(vocab, hidden_size=128, layers=2), train, tok_dir, teachers[0],
                             args.teacher_steps, seed=11)
        pretrain_teacher(tiny_llama_config(vocab, hidden_size=args.teacher2_hidden, layers=args.teacher2_layers),
                         train, tok_dir, teachers[1], args.teacher_steps, seed=args.teacher2_seed)
        print(f"[ablation_multi] teachers ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    caches = [root / "cache1", root / "cache2"]
    if "caches" in stages:
        for teacher, cache in zip(teachers, caches, strict=True):
            if not (cache / "manifest.json").is_file():
                build_cache(teacher, train_text, cache, top_k=args.top_k, max_length=MAX_LENGTH,
                            extra=["--no-progress"])
        for i, teacher in enumerate(teachers, start=1):
            if _saved(results / f"teacher{i}.json") is None:
                model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
                _save(results / f"teacher{i}.json", evaluate_windows(model, held)[0],
                      params=sum(p.numel() for p in model.parameters()), arch=type(model).__name__)
    both = [float(w) for w in args.both_weights.split(",")]
    if len(both) != 2:
        raise ConfigError(f"--both-weights {args.both_weights}: give two weights, e.g. 0.75,0.25")
    if "students" in stages:
        readers = [TeacherCacheReader(c) for c in caches]
        check_same_windows([(c, r.manifest) for c, r in zip(caches, readers, strict=True)])
        full = [i for i in range(len(readers[0])) if readers[0][i].length == MAX_LENGTH]
        student_config = tiny_llama_config(vocab, hidden_size=64, layers=2)
        for seed in args.seeds:
            order = batch_order(full, args.steps, 16, seed)
            for variant in VARIANTS:
                path = results / result_name(seed, variant, args)
                if _saved(path) is not None:
                    continue
                t1 = time.perf_counter()
                model = train_student(variant, student_config, readers, order, args.steps, seed, both)
                _save(path, evaluate_windows(model, held)[0], train_windows=len(full))
                print(f"[ablation_multi] seed {seed} {variant}: held-out loss {_saved(path):.4f} "
                      f"({time.perf_counter() - t1:.0f} s)", flush=True)
    if "report" in stages:
        losses: dict[str, list[float]] = {f"teacher model {i}": [_saved(results / f"teacher{i}.json")]
                                          for i in (1, 2)}
        for variant in VARIANTS:
            losses[variant] = [_saved(results / result_name(seed, variant, args)) for seed in args.seeds]
        missing = [k for k, v in losses.items() if None in v]
        if missing:
            raise ConfigError(f"--stage report: no results yet for {', '.join(missing)} in {results}; run the "
                              "earlier stages with the same --work, --steps and --seeds")
        rows = summarise(losses)
        print_table(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                                "held_out_windows": len(held)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
