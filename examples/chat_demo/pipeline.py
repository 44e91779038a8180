"""The chat demo's stages (see `examples.chat_demo`). Tools run as subprocesses through their real command lines;
each stage prints one status line and logs to OUT/logs/<stage>.log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PAD_ROWS = 32  # the teacher's head has more rows than its tokenizer has tokens, like Qwen's


class DemoError(RuntimeError):
    pass


@dataclass
class ChatSettings:
    conversations: int = 1000
    teacher_vocab: int = 1024
    student_vocab: int = 768
    max_length: int = 192
    top_k: int = 16
    # A teacher trained long enough to be clearly better than the students is what KD needs (see docs/RESULTS.md).
    teacher_steps: int = 500
    student_steps: int = 240
    batch_size: int = 8
    seeds: int = 3


QUICK = ChatSettings(conversations=60, teacher_vocab=400, student_vocab=360, max_length=128, top_k=8,
                     teacher_steps=4, student_steps=3, batch_size=4, seeds=1)


def status(step: int, total: int, name: str, detail: str) -> None:
    print(f"[chat-demo {step}/{total}] {name}: {detail}", flush=True)


def run_logged(cmd: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-10:]
        raise DemoError(f"{log.stem} failed (exit {proc.returncode}); full log: {log}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def train_cmd(out: Path, steps: int, batch: int, lr: float, seed: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distill.train", "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--learning_rate", str(lr), "--lr_scheduler_type", "cosine",
            "--warmup_steps", "0.05", "--logging_steps", str(max(1, steps // 10)), "--save_strategy", "no",
            "--seed", str(seed), "--report_to", "none", "--disable_tqdm", "true", "--use_cpu",
            "--dataloader_num_workers", "0", *extra]


def run(out: Path, s: ChatSettings) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from examples.chat_demo import data
    from examples.tiny_models import tiny_llama_config

    total, seconds = 7, {}
    logs = out / "logs"
    t0 = time.perf_counter()
    rows = data.conversations(s.conversations)
    train, held = data.split_rows(rows)
    train_file, held_file = data.write_jsonl(out / "data" / "train.jsonl", train), data.write_jsonl(
        out / "data" / "heldout.jsonl", held)
    turns = sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)
    status(1, total, "conversations", f"{len(train)} training / {len(held)} held-out conversations ({turns} assistant "
           "turns) from Python standard-library docstrings")

    texts = [m["content"] for r in train for m in r["messages"]]
    teacher_tok_dir = data.train_tokenizer(texts, s.teacher_vocab, data.TEACHER_SPECIALS, data.TEACHER_TEMPLATE,
                                           out / "teacher_tokenizer")
    student_tok_dir = data.train_tokenizer(texts, s.student_vocab, data.STUDENT_SPECIALS, data.STUDENT_TEMPLATE,
                                           out / "student_tokenizer", split_digits=True)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_tok_dir)
    student_tok = AutoTokenizer.from_pretrained(student_tok_dir)
    seconds["data"] = time.perf_counter() - t0
    sample = train[0]["messages"]
    status(2, total, "tokenizers", f"teacher {len(teacher_tok)} tokens (Qwen3-shaped template), student "
           f"{len(student_tok)} tokens (Zephyr-shaped template); one conversation renders to "
           f"{len(teacher_tok.apply_chat_template(sample, tokenize=False))} / "
           f"{len(student_tok.apply_chat_template(sample, tokenize=False))} characters")

    # The teacher learns the chat format LM-only on its own rendering of the training conversations.
    teacher_text = data.write_jsonl(out / "data" / "teacher_text.jsonl",
                                    [{"text": t} for t in data.rendered_texts(teacher_tok, train)])
    # A dense teacher: on two CPU cores a Qwen3-MoE of this size trains several times slower (per-expert loops).
    cfg = tiny_llama_config(len(teacher_tok) + PAD_ROWS, hidden_size=128, layers=3)
    cfg.tie_word_embeddings = False
    cfg.save_pretrained(out / "teacher_config")
    seconds["teacher"] = run_logged(train_cmd(
        out / "teacher_run", s.teacher_steps, s.batch_size, 3e-3, 0, "--student_config",
        str(out / "teacher_config" / "config.json"), "--tokenizer", str(teacher_tok_dir), "--dataset",
        str(teacher_text), "--max_length", str(s.max_length), "--packing", "isolated", "--kd_weight", "0"),
        logs / "teacher.log")
    teacher = out / "teacher_run" / "student"
    status(3, total, "teacher", f"dense Llama, {s.teacher_steps} LM steps on the rendered conversations "
           f"({seconds['teacher']:.0f} s)")

    t0 = time.perf_counter()
    for name, source in (("cache", train_file), ("eval_cache", held_file)):
        run_logged([sys.executable, "-m", "cache_tools", "build-cache", "--teacher", str(teacher), "--dataset",
                    str(source), "--output", str(out / name), "--max-length", str(s.max_length), "--top-k",
                    str(s.top_k), "--batch-size", "8", "--device", "cpu", "--no-progress"], logs / f"{name}.log")
    seconds["caches"] = time.perf_counter() - t0
    stored = cache_summary(out / "cache")
    status(4, total, "caches", f"{stored['windows']} windows, targets stored on {stored['stored']} of "
           f"{stored['positions']} positions ({stored['not_stored']} prompt/markup positions not stored; "
           f"{seconds['caches']:.0f} s)")

    t0 = time.perf_counter()
    run_logged([sys.executable, "-m", "distill.prepare_xtok", str(out / "cache"), "--student-tokenizer",
                str(student_tok_dir), "--workers", "1"], logs / "prepare_xtok.log")
    coverage = json.loads(subprocess.run(
        [sys.executable, "-m", "distill.coverage", str(out / "cache"), "--student-tokenizer", str(student_tok_dir),
         "--json"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout)
    seconds["xtok"] = time.perf_counter() - t0
    status(5, total, "cross-template", f"{100 * coverage['assistant_aligned_fraction']:.1f}% of student assistant "
           f"tokens get a KD target ({100 * coverage['aligned_fraction']:.1f}% of all student tokens)")

    t0 = time.perf_counter()
    student_cfg = out / "student_config"
    tiny_llama_config(len(student_tok)).save_pretrained(student_cfg)
    runs: dict[str, list[float]] = {"kd": [], "lm_only": []}
    for seed in range(s.seeds):
        for kind, weight in (("kd", "1.0"), ("lm_only", "0")):
            run_dir = out / f"{kind}_seed{seed}"
            run_logged(train_cmd(run_dir, s.student_steps, s.batch_size, 3e-3, seed, "--student_config",
                                 str(student_cfg / "config.json"), "--tokenizer", str(student_tok_dir), "--cache",
                                 str(out / "cache"), "--kd_weight", weight), logs / f"{run_dir.name}.log")
            runs[kind].append(heldout_ce(run_dir / "student", out / "eval_cache"))
    seconds["students"] = time.perf_counter() - t0
    status(6, total, "students", f"{s.seeds} seed(s) x (KD, LM-only), {s.student_steps} steps each "
           f"({seconds['students']:.0f} s)")
    return {"settings": s.__dict__, "cache": stored, "coverage": coverage, "heldout_assistant_ce": runs,
            "seconds": seconds}


def cache_summary(cache_dir: Path) -> dict[str, int]:
    from cache_tools.format.reader import TeacherCacheReader

    reader = TeacherCacheReader(cache_dir)
    positions = stored = 0
    for i in range(len(reader)):
        seq = reader[i]
        positions += seq.length
        stored += int(seq.target_mask.sum())
    return {"windows": len(reader), "positions": positions, "stored": stored, "not_stored": positions - stored}


def heldout_ce(student_dir: Path, eval_cache: Path) -> float:
    """Mean CE of the student on the held-out conversations' assistant tokens (its own rendering and template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.evaluate import evaluate_student

    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    return float(evaluate_student(model, AutoTokenizer.from_pretrained(student_dir), eval_cache)["ce"])


def clean(out: Path) -> None:
    if out.exists():
        if not (out / ".chat_demo").exists():
            raise DemoError(f"--out {out}: folder exists and is not a chat demo folder; pick another")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / ".chat_demo").touch()
