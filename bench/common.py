"""Helpers shared by the benchmarks: timing that syncs the device, environment/version records, the tiny offline
teacher/student/tokenizer every benchmark uses, and running the project's CLIs as subprocesses like a user would.

Result convention (what `python -m bench` understands; any other keys are recorded as they are):

    {"ratios": {name: {"value": float, "goal": "<= 1.05", "met": bool | None, "baseline": str}},
     "shapes": {...}, "dtype": str, "notes": [str, ...], ...raw measurements...}

`ratio(value, baseline, goal)` builds one entry; `goal` is "<= x", ">= x" or "" (informational).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache_tools.format import fsutil
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_ROOT = REPO_ROOT / "bench" / ".work"  # git-ignored scratch (see bench/.gitignore)

# Offline and quiet: benchmarks must never reach the hub, and tokenizers' own threads would skew CPU timings.
OFFLINE_ENV = {**fsutil.OFFLINE_ENV, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}


def apply_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def ratio(value: float, baseline: float, goal: str = "", baseline_name: str = "") -> dict[str, Any]:
    """One ratio entry: value / baseline, with whether it meets `goal` ("<= x" / ">= x"; "" = no goal)."""
    r = float(value) / float(baseline) if baseline else float("nan")
    met: bool | None = None
    if goal:
        op, bound = goal.split()
        met = r <= float(bound) if op == "<=" else r >= float(bound)
    return {"value": r, "goal": goal, "met": met, "baseline": baseline_name}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, *, warmup: int = 2, iters: int = 5) -> dict[str, float]:
    """Median and min wall seconds of `fn()` over `iters` runs after `warmup` runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "iters": iters}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "h5py", "numpy"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except Exception as err:  # noqa: BLE001 - a missing optional library is recorded, not fatal
            out[name] = f"unavailable ({type(err).__name__})"
    return out


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False; use --device cpu")
    return device


def run_cli(args: list[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None) -> float:
    """Run `python -m <args>` (a project CLI) like a user would; returns wall seconds. On failure raises
    RuntimeError with the command and the last lines of its output."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    cmd = [sys.executable, "-m", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}", encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall


def tiny_assets(root: Path, *, vocab: int = 512, teacher_hidden: int = 64, student_hidden: int = 48,
                docs: int = 300, teacher_layers: int = 2) -> dict[str, Path]:
    """Tokenizer, text file, random tiny Qwen3-MoE teacher and Llama student under `root` (built once, reused).

    Returns {"tokenizer", "text", "teacher", "student"} paths. Timing benchmarks do not need trained weights: the
    compute per step does not depend on the values."""
    from transformers import AutoTokenizer

    from examples.tiny_models import (
        save_random_model,
        stdlib_docstrings,
        tiny_llama_config,
        tiny_qwen3_moe_config,
        train_bpe_tokenizer,
    )

    # One folder per size, so benchmarks asking for different sizes under the same root never overwrite each other.
    root = root / f"v{vocab}-t{teacher_hidden}x{teacher_layers}-s{student_hidden}-d{docs}"
    root.mkdir(parents=True, exist_ok=True)
    paths = {name: root / name for name in ("tokenizer", "teacher", "student")}
    paths["text"] = root / "docs.txt"
    marker = root / "ready"
    if marker.exists():
        return paths
    corpus = stdlib_docstrings(max_docs=docs)
    train_bpe_tokenizer(corpus, vocab).save_pretrained(paths["tokenizer"])
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    # One document per line: the `.txt` loader reads lines as documents.
    paths["text"].write_text("\n".join(d.replace("\n", " ") for d in corpus) + "\n", encoding="utf-8")
    save_random_model(tiny_qwen3_moe_config(len(tok), hidden_size=teacher_hidden, layers=teacher_layers),
                      paths["teacher"], tok, seed=0)
    save_random_model(tiny_llama_config(len(tok), hidden_size=student_hidden), paths["student"], tok, seed=1)
    marker.touch()
    return paths


def build_cache(teacher: Path, text: Path, out: Path, *, top_k: int | None, max_length: int, compression: str = "none",
                max_samples: int | None = None, extra: list[str] | None = None) -> float:
    """`cache_tools build-cache` through its real CLI (subprocess); returns wall seconds. `top_k=None` leaves the
    flag out (sampled targets refuse it)."""
    args = ["cache_tools", "build-cache", "--teacher", str(teacher), "--dataset", str(text), "--output", str(out),
            "--max-length", str(max_length), "--compression", compression, "--overwrite", "--dtype", "fp32"]
    if top_k is not None:
        args += ["--top-k", str(top_k)]
    if max_samples is not None:
        args += ["--max-samples", str(max_samples)]
    return run_cli(args + (extra or []), log_path=out.parent / f"{out.name}.log")


def run_standalone(run_fn: Any, description: str, argv: list[str] | None = None) -> int:
    """`python -m bench.bench_X [--quick] [--device cpu|cuda]`: run one benchmark alone and print its JSON."""
    import json

    parser = StrictArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    cli = parse_command_line(parser, argv)
    apply_offline_env()
    print(json.dumps(run_fn(cli.quick, resolve_device(cli.device)), indent=2, default=str))
    return 0
