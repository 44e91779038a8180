"""The demo's stages, in order (see `examples.demo` for the overview). Each stage prints one status line; tools run as
subprocesses through their real command lines, exactly as a user would type them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from cache_tools.format.fsutil import OFFLINE_ENV
from examples.demo.common import (
    CPU_LAUNCH_CONFIG,
    DemoError,
    DemoSettings,
    Job,
    accelerate_cmd,
    prepare_out,
    run_concurrently,
    run_logged,
    status,
    train_args,
)

TOTAL = 8


def run_pipeline(args: argparse.Namespace, s: DemoSettings) -> Path:
    from examples.demo import data as demo_data
    from examples.demo import evaluation as demo_eval

    t_start = time.perf_counter()
    out: Path = args.out.resolve()
    logs, runs = out / "logs", out / "runs"
    env = {**OFFLINE_ENV, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    os.environ.update(env)
    seconds: dict[str, float] = {}

    # 1. text
    t0 = time.perf_counter()
    docs = demo_data.load_texts(args.text_file, args.dataset, s.max_docs, s.min_chars)
    prepare_out(out, args.overwrite)  # only once the input is known to be usable: a bad flag leaves nothing behind
    train_docs, eval_docs = demo_data.split_docs(docs)
    train_file = demo_data.write_jsonl(out / "data" / "train.jsonl", train_docs)
    eval_file = demo_data.write_jsonl(out / "data" / "eval.jsonl", eval_docs)
    source = args.text_file or args.dataset or "Python standard-library docstrings"
    seconds["text"] = time.perf_counter() - t0
    status(1, TOTAL, "text", f"{len(train_docs)} training / {len(eval_docs)} held-out documents from {source} "
           f"({sum(map(len, train_docs)) / 1e6:.2f} MB train)")

    # 2. tokenizers. Shared by default (the direct path); --student-vocab-size N trains a different, smaller student
    # tokenizer (other pre-tokenisation too) and the students then learn through the cross-tokenizer path.
    t0 = time.perf_counter()
    tok_dir = demo_data.train_tokenizer(train_docs, s.vocab_size, out / "tokenizer")
    student_tok_dir = tok_dir
    if s.student_vocab_size:
        student_tok_dir = demo_data.train_tokenizer(train_docs, s.student_vocab_size, out / "student_tokenizer",
                                                    split_digits=True)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    student_vocab = len(AutoTokenizer.from_pretrained(student_tok_dir))
    teacher_cfg, student_cfg = demo_data.write_model_configs(
        out / "configs", vocab, student_vocab, teacher_hidden=s.teacher_hidden, teacher_layers=s.teacher_layers,
        student_hidden=s.student_hidden, student_layers=s.student_layers, max_length=s.max_length)
    seconds["tokenizer"] = time.perf_counter() - t0
    detail = f"byte-level BPE, {vocab} tokens" + (f"; student {student_vocab} tokens" if s.student_vocab_size
                                                  else " (shared by teacher and student)")
    status(2, TOTAL, "tokenizer", f"{detail} ({seconds['tokenizer']:.1f} s)")

    # 3. teacher, LM-only, with the project's trainer; kept between runs with the same inputs (examples/demo/
    # teacher_cache.py), so a rerun skips the demo's longest stage.
    from examples.demo import teacher_cache

    teacher_out = out / "teacher"
    teacher_dir = teacher_out / "student"  # the trainer exports its final model there
    key = teacher_cache.teacher_key(
        [train_file, tok_dir, teacher_cfg],
        {"steps": s.teacher_steps, "lr": s.teacher_lr, "batch_size": s.batch_size, "seed": s.seed,
         "max_length": s.max_length, "packing": s.packing})
    t0 = time.perf_counter()
    reused = not getattr(args, "retrain_teacher", False) and teacher_cache.restore(key, teacher_dir, runs / "teacher")
    if not reused:
        cmd = [sys.executable, "-m", "distill.train", "--student_config", str(teacher_cfg), "--tokenizer",
               str(tok_dir), "--dataset", str(train_file), "--max_length", str(s.max_length), "--kd_weight", "0",
               "--packing", s.packing,
               *train_args(s, teacher_out, steps=s.teacher_steps, lr=s.teacher_lr)]
        run_logged(cmd, logs / "teacher.log", {"TENSORBOARD_LOGGING_DIR": str(runs / "teacher")})
        if not (teacher_dir / "config.json").is_file():
            raise DemoError(f"teacher: the trainer did not export a model to {teacher_dir}; see {logs / 'teacher.log'}")
        teacher_cache.keep(key, teacher_dir, runs / "teacher")
    seconds["teacher"] = time.perf_counter() - t0
    n_teacher = demo_data.count_params(teacher_cfg)
    how = (f"reused from {teacher_cache.cache_root() / key} (same inputs; --retrain-teacher trains it again)"
           if reused else "trained")
    status(3, TOTAL, "teacher", f"Qwen3-MoE, {n_teacher / 1e6:.2f} M params, {s.teacher_steps} steps, {how} "
           f"({seconds['teacher']:.1f} s)")

    # 4. teacher caches: top-k (compact) and sampled (RS-KD), each for the training text and for the held-out text
    # (the trainer's eval curves). The samples are drawn at the KD temperature: the trainer refuses any other.
    t0 = time.perf_counter()
    target_flags = {"cache": ["--top-k", str(s.top_k)],
                    "sampled_cache": ["--targets", "sampled", "--samples", str(s.samples),
                                      "--sample-temperature", str(s.temperature), "--seed", str(s.seed)]}
    builds = [Job(name, [*cache_tools_cmd(), "build-cache", "--teacher", str(teacher_dir), "--dataset", str(data),
                         "--output", str(out / name), *flags, "--encoding", s.encoding, "--max-length",
                         str(s.max_length), "--compression", s.compression, "--dtype", "fp32", "--no-progress",
                         "--packing", s.packing],
                  logs / f"{name}.log")
              for kind, flags in target_flags.items()
              for name, data in ((kind, train_file), (f"eval_{kind}", eval_file))]
    run_concurrently(builds)  # four independent builds, one thread each (see run_concurrently)
    seconds["cache"] = time.perf_counter() - t0
    bpt = {kind: demo_eval.cache_bytes_per_token(out / kind) for kind in target_flags}
    status(4, TOTAL, "cache", f"top-{s.top_k} {s.encoding}: {bpt['cache']:.1f} bytes/token; sampled N={s.samples}: "
           f"{bpt['sampled_cache']:.1f} bytes/token ({seconds['cache']:.1f} s)")

    # 5./6./7. students: identical command lines except the cache and the KD weight
    students = {"kd_student": ("cache", s.kd_weight), "rs_student": ("sampled_cache", s.kd_weight),
                "lm_student": ("cache", 0.0)}
    labels = {"kd_student": f"KD student, top-{s.top_k} cache (accelerate, CPU recipe)",
              "rs_student": f"RS-KD student, sampled N={s.samples} cache (same command)",
              "lm_student": "LM-only student (same command, kd 0)"}
    jobs = []
    for name, (cache, kd_weight) in students.items():
        cmd = [*accelerate_cmd(), "-m", "distill.train", "--student_config", str(student_cfg), "--tokenizer",
               str(student_tok_dir), "--cache", str(out / cache), "--eval_cache", str(out / f"eval_{cache}"),
               "--max_eval_sequences", str(s.eval_windows), "--eval_strategy", "steps",
               "--eval_steps", str(max(1, s.student_steps // 4)), "--ce_weight", str(s.ce_weight),
               "--kd_weight", str(kd_weight), "--temperature", str(s.temperature),
               *train_args(s, out / name, steps=s.student_steps, lr=s.student_lr)]
        jobs.append(Job(name, cmd, logs / f"{name}.log", {"TENSORBOARD_LOGGING_DIR": str(runs / name)}))
    t0 = time.perf_counter()
    student_seconds = run_concurrently(jobs)  # the three students train side by side, one thread each
    seconds["students"] = time.perf_counter() - t0
    for index, name in enumerate(students, start=5):
        seconds[name] = student_seconds[name]
        status(index, TOTAL, name, f"{labels[name]}, {s.student_steps} steps ({seconds[name]:.1f} s, "
               "concurrently with the other students)")

    # 8. evaluation + report
    t0 = time.perf_counter()
    windows = demo_eval.held_out_windows(tok_dir, eval_file, s.max_length, s.eval_windows)
    student_windows = windows
    if s.student_vocab_size:
        student_windows = demo_eval.held_out_windows(student_tok_dir, eval_file, s.max_length, s.eval_windows)
    models = {"teacher": (teacher_dir, windows),
              **{name: (out / name / "student", student_windows) for name in students}}
    metrics = demo_eval.evaluate_models(models)
    for name in students:
        if metrics[name]["top1_agreement"] is None:  # different tokenizers: no shared positions on raw windows
            metrics[name]["top1_agreement"] = demo_eval.logged_eval_top1(runs / name)
    seconds["evaluate"] = time.perf_counter() - t0
    from cache_tools.format.schema import load_manifest

    manifest = load_manifest(out / "cache")
    info = {
        "tokenizers": (f"teacher {vocab} tokens, student {student_vocab} tokens (cross-tokenizer path)"
                       if s.student_vocab_size else f"one {vocab}-token tokenizer shared by teacher and students"),
        "text_source": source, "train_docs": len(train_docs), "eval_docs": len(eval_docs),
        "eval_tokens": metrics["teacher"]["eval_tokens"], "cpu_count": os.cpu_count(),
        # The trainer's own throughput (median of its logged tokens/s), so process start-up is not counted.
        "tokens_per_s": {name: demo_eval.logged_tokens_per_s(runs / name) for name in models},
        "cache_bytes_per_token": bpt, "top_k": s.top_k, "samples": s.samples, "encoding": s.encoding,
        "compression": s.compression, "cpu_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",
                                                                                   "ATEN_CPU_CAPABILITY", "MKL_CBWR")},
        "cache_tokens": manifest.num_tokens, "runs_dir": str(runs), "stage_seconds": seconds,
        "total_s": time.perf_counter() - t_start, "settings": dataclasses.asdict(s),
        "command": " ".join(["python -m examples.demo", *args.argv]), "launch_config": str(CPU_LAUNCH_CONFIG),
    }
    report = demo_eval.write_report(out, metrics, info)
    gain = 100 * (metrics["lm_student"]["val_loss"] - metrics["kd_student"]["val_loss"]) / metrics["lm_student"][
        "val_loss"]
    status(8, TOTAL, "evaluate", f"held-out loss KD {metrics['kd_student']['val_loss']:.4f} vs LM-only "
           f"{metrics['lm_student']['val_loss']:.4f} ({gain:+.1f}%) ({seconds['evaluate']:.1f} s)")
    return report


def cache_tools_cmd() -> list[str]:
    """The `cache_tools` console script installed beside this Python, else `python -m cache_tools`."""
    exe = Path(sys.executable).parent / "cache_tools"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cache_tools"]
