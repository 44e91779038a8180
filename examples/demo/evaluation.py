"""Demo evaluation and report: held-out loss, perplexity and top-1 agreement with the teacher for each model, on the
same held-out windows, with no autocast (fp32; `distill.evaluate.evaluate_windows`), and `report.md` / `report.json`
written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from cache_tools.format.fsutil import atomic_write_text
from cache_tools.format.schema import load_manifest


def held_out_windows(tokenizer_dir: Path, eval_file: Path, max_length: int, max_windows: int) -> torch.Tensor:
    """Pack the held-out documents into full windows of `max_length` tokens -> [W, max_length] int64."""
    from transformers import AutoTokenizer

    from cache_tools.format.text_data import load_documents, pack_windows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for window in pack_windows(tokenizer, load_documents(str(eval_file)), max_length):
        if len(window.input_ids) == max_length:  # equal-length windows: every model sees exactly the same tokens
            rows.append(torch.as_tensor(window.input_ids, dtype=torch.long))
        if len(rows) >= max_windows:
            break
    if not rows:
        raise ValueError(f"{eval_file}: held-out text is shorter than one window of {max_length} tokens; "
                         "give more text or a smaller --max-length")
    return torch.stack(rows)


def evaluate_models(models: dict[str, tuple[Path, torch.Tensor]]) -> dict[str, Any]:
    """Held-out loss (nats/token), perplexity and top-1 agreement with the teacher for each (model dir, windows
    [W, L]) pair; "teacher" must be one of them. Agreement is only defined where a model reads the teacher's very
    windows (same tokenizer); elsewhere it is None. Loss is per token of each model's own tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from distill.evaluate import evaluate_windows

    hf_logging.disable_progress_bar()  # one status line per stage: no weight-loading bars between them
    results: dict[str, Any] = {}
    argmax: dict[str, torch.Tensor] = {}
    for name, (path, windows) in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        loss, argmax[name] = evaluate_windows(model, windows)
        results[name] = {"val_loss": loss, "perplexity": math.exp(loss), "eval_tokens": argmax[name].numel(),
                         "params": sum(p.numel() for p in model.parameters())}
        del model
    teacher_windows = models["teacher"][1]
    for name, (_, windows) in models.items():
        same = windows.shape == teacher_windows.shape and bool((windows == teacher_windows).all())
        results[name]["top1_agreement"] = float((argmax[name] == argmax["teacher"]).float().mean()) if same else None
    return results


def _logged(run_dir: Path, tag: str) -> list[float]:
    """Every value of a TensorBoard scalar `tag` logged under `run_dir` (empty when the run logged none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags().get("scalars", []) else []


def logged_tokens_per_s(run_dir: Path) -> float | None:
    """Median of the trainer's `train/tokens_per_second` TensorBoard scalar (None when the run logged none)."""
    import statistics

    values = _logged(run_dir, "train/tokens_per_second")
    return statistics.median(values) if values else None


def logged_eval_top1(run_dir: Path) -> float | None:
    """The trainer's last `eval/top1_agreement`: on the held-out cache, at the positions aligned with the teacher,
    in student ids. The one agreement figure defined when student and teacher tokenize differently."""
    values = _logged(run_dir, "eval/top1_agreement")
    return values[-1] if values else None


def cache_bytes_per_token(cache_dir: Path) -> float:
    manifest = load_manifest(cache_dir)
    return sum(s.bytes for s in manifest.shards) / max(manifest.num_tokens, 1)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(out_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> Path:
    """report.md (table + verdict + figures + how to see the curves) and report.json (same numbers,
    machine-readable); the figures (PNG) are written beside them."""
    from examples.demo.plots import markdown, write_figures

    kd, lm = metrics["kd_student"]["val_loss"], metrics["lm_student"]["val_loss"]
    gain = (lm - kd) / lm
    rs_gain = (lm - metrics["rs_student"]["val_loss"]) / lm if "rs_student" in metrics else None
    info = {**info, "kd_gain_fraction": gain, "rs_gain_fraction": rs_gain}
    bpt = info["cache_bytes_per_token"]
    rows = [("teacher", "Teacher (Qwen3-MoE, LM-only)"),
            ("kd_student", f"Student, distilled from the top-{info['top_k']} cache ({bpt['cache']:.1f} B/token)"),
            ("rs_student", f"Student, distilled from the sampled N={info['samples']} cache "
                           f"({bpt.get('sampled_cache', 0):.1f} B/token)"),
            ("lm_student", "Student, LM-only (same steps, seed, data)")]
    rows = [row for row in rows if row[0] in metrics]
    figures = write_figures(out_dir, Path(info["runs_dir"]), {k: v for k, v in rows if k != "teacher"},
                            metrics.get("teacher", {}).get("val_loss"), bpt)
    info["figures"] = {k: str(v) for k, v in figures.items()}
    lines = [
        "# Distillation demo report",
        "",
        f"Text: {info['text_source']} ({info['train_docs']} training documents, {info['eval_docs']} held out; "
        f"{info['eval_tokens']} held-out tokens evaluated). Total wall time {info['total_s']:.0f} s on "
        f"{info['cpu_count']} CPU core(s). Tokenizers: {info['tokenizers']}"
        + (" (each loss is per token of the model's own tokenizer: compare the students with each other; the "
           "students' top-1 agreement is the trainer's evaluation on the held-out cache, at positions aligned with "
           "the teacher)." if "cross" in info["tokenizers"] else "."),
        "",
        "| model | params | val loss | perplexity | top-1 agreement with teacher | train tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in rows:
        m = metrics[key]
        tps = info["tokens_per_s"].get(key)
        lines.append(f"| {label} | {m['params']:,} | {m['val_loss']:.4f} | {m['perplexity']:.2f} | "
                     f"{_fmt(m['top1_agreement'], '.3f')} | {_fmt(tps, ',.0f')} |")
    verdict = "beats" if gain > 0 else "does NOT beat"
    lines += [
        "",
        "Teacher caches (every byte of every shard per token, " + f"{info['cache_tokens']:,} tokens, "
        f"{info['encoding']} encoding, {info['compression']} compression): "
        + "; ".join(f"{name} {value:.1f} B/token" for name, value in bpt.items()) + ".",
        "",
        f"**The distilled student {verdict} the LM-only student on held-out loss by {100 * gain:.1f}%** "
        f"({kd:.4f} vs {lm:.4f} nats/token; goal: at least 3%)"
        + (f"; from sampled targets by {100 * rs_gain:.1f}%." if rs_gain is not None else "."),
        "",
        *markdown(figures),
        "Training curves: `tensorboard --logdir " + str(info["runs_dir"]) + "` (runs: "
        + ", ".join(name for name, _ in rows) + ").",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in info["stage_seconds"].items()),
        "",
        "Command: `" + info["command"] + "`",
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(out_dir / "report.json", json.dumps({"metrics": metrics, "info": info}, indent=2) + "\n")
    return path
