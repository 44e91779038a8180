"""Pieces shared by the demo's command line (`examples.demo`) and its stages (`examples.demo.pipeline`): settings,
status lines, running a logged subprocess, and the real command lines the demo calls."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_LAUNCH_CONFIG = REPO_ROOT / "launch" / "accelerate" / "cpu.yaml"


@dataclass
class DemoSettings:
    """Sizes and hyper-parameters. Defaults are what docs/RESULTS.md reports; `QUICK` shrinks them for CI."""

    max_docs: int | None = None  # documents read (None = all stdlib docstrings of >= min_chars)
    min_chars: int = 100
    vocab_size: int = 2048
    student_vocab_size: int = 1024  # N: the student has its own N-token tokenizer (cross-tokenizer); 0: shared
    max_length: int = 128
    teacher_hidden: int = 192
    teacher_layers: int = 4
    teacher_steps: int = 1000
    teacher_lr: float = 3e-3
    student_hidden: int = 64
    student_layers: int = 2
    student_steps: int = 300
    student_lr: float = 3e-3
    batch_size: int = 16
    top_k: int = 256  # the card's k: the compact encoding makes it cheap
    encoding: str = "compact"
    samples: int = 64  # N draws per position for the sampled-target (RS-KD) student's cache
    compression: str = "lzf"
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    temperature: float = 1.0  # RS-KD samples at T = 1 (at T = 2 sampled KD tracks full-vocabulary KD: see RESULTS)
    eval_windows: int = 64
    # The demo packs across documents, unlike the tools' default (isolated): with this cross-tokenizer student the KD
    # margin over LM-only is larger there (docs/RESULTS.md, section 14), while isolated students reach a lower loss
    # in absolute terms. The held-out judge (evaluation.held_out_windows) reads cross-document windows.
    packing: str = "cross_document"
    seed: int = 0


QUICK = dict(max_docs=240, min_chars=200, vocab_size=512, student_vocab_size=384, max_length=64, teacher_hidden=64,
             teacher_layers=2, teacher_steps=30, student_hidden=32, student_steps=20, batch_size=8, eval_windows=8)


# Bit-reproducible CPU numbers across machines. ATen and MKL choose their SIMD kernels (AVX2, AVX-512) from the host
# CPU, and the thread count decides how sums are split: either changes float results in the last bits, and 1,000
# steps of a MoE teacher (discrete expert routing) turn those bits into a different model (measured: the same teacher
# run twice is bit-identical; with AVX2 kernels forced, or 2 threads instead of 1, it differs after 60 steps).
# Pinning both makes every x86 machine with AVX2 take the same code path. Values the user set win.
# Never more threads than are free, though: threads beyond the idle cores wait on each other at every barrier, so
# on a busy machine the demo takes 1 thread, and its numbers are then those of the 1-thread path (the report records
# which).
def _cpu_times(stat: str) -> tuple[int, int]:
    """(idle, total) jiffies of the aggregate `cpu` line of /proc/stat (idle includes iowait)."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)


def busy_cores(first: str, second: str, cores: int) -> int:
    """Cores kept busy between two /proc/stat snapshots, rounded."""
    idle0, total0 = _cpu_times(first)
    idle1, total1 = _cpu_times(second)
    span = total1 - total0
    return round(cores * (1 - (idle1 - idle0) / span)) if span > 0 else 0


def free_cores(window_s: float = 0.5) -> int:
    """Cores this process may use (affinity) minus the ones busy right now; at least 1. Busy is measured over
    `window_s` from /proc/stat: the 1-minute load average lags, so right after another job it still counts that
    job's cores and would pin an idle machine to one thread (a different, slower path)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        first = Path("/proc/stat").read_text()
        time.sleep(window_s)
        busy = busy_cores(first, Path("/proc/stat").read_text(), os.cpu_count() or usable)
    except (OSError, ValueError, IndexError):
        busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, usable - busy)


def reproducible_cpu_env() -> dict[str, str]:
    threads = str(min(2, free_cores()))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    return {key: value for key, value in env.items() if key not in os.environ}


class DemoError(RuntimeError):
    """A stage failed; the message names the stage, its log file and the last lines of its output."""


def status(index: int, total: int, stage: str, detail: str) -> None:
    print(f"[demo {index}/{total}] {stage}: {detail}", flush=True)


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> float:
    """Run `cmd` with stdout+stderr to `log_path`; returns wall seconds, raises DemoError on a non-zero exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
        raise DemoError(f"{log_path.stem} failed (exit {proc.returncode}); full log: {log_path}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def accelerate_cmd() -> list[str]:
    """`accelerate launch --config_file launch/accelerate/cpu.yaml` from the same environment as this Python."""
    exe = Path(sys.executable).parent / "accelerate"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    return [*launcher, "launch", "--config_file", str(CPU_LAUNCH_CONFIG)]


@dataclass
class Job:
    """One logged command of a stage that runs beside the others."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None


def run_concurrently(jobs: list[Job]) -> dict[str, float]:
    """Run a stage's independent commands at the same time, one CPU thread each; returns wall seconds per job.

    Why: the students are tiny and the builds have long serial stretches (tokenising, packing, encoding), so one
    process with two threads leaves a core idle most of the time, while one single-threaded process per core keeps
    both busy. One thread per process also means no thread ever waits at a barrier for a sibling that another
    process has pushed off its core, so the stage degrades gracefully on a busy machine, and its numbers do not
    depend on how many cores were free. The first failure stops the others and raises DemoError."""
    single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, float] = {}
    try:
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "w", encoding="utf-8")  # closed when the job ends (below)
            log.write("$ " + " ".join(job.cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(job.cmd, cwd=REPO_ROOT, env={**os.environ, **(job.env or {}), **single},
                                    stdout=log, stderr=subprocess.STDOUT)
            running[job.name] = (proc, time.perf_counter(), log)
        while running:
            for job in jobs:
                if job.name not in running or running[job.name][0].poll() is None:
                    continue
                proc, start, log = running.pop(job.name)
                log.close()
                seconds[job.name] = time.perf_counter() - start
                if proc.returncode != 0:
                    tail = job.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
                    raise DemoError(f"{job.name} failed (exit {proc.returncode}); full log: {job.log}\n"
                                    + "\n".join(tail))
            time.sleep(0.2)
    finally:
        for proc, _, log in running.values():
            proc.kill()
            proc.wait()
            log.close()
    return seconds


def train_args(s: DemoSettings, out: Path, *, steps: int, lr: float) -> list[str]:
    """Flags shared by every training run (TrainingArguments names, see distill/config.py)."""
    return ["--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", str(s.batch_size),
            "--learning_rate", str(lr), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
            "--weight_decay", "0.01", "--logging_steps", str(max(1, steps // 20)), "--save_strategy", "no",
            "--seed", str(s.seed), "--report_to", "tensorboard", "--dataloader_num_workers", "0"]


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite and not (out / ".demo").exists():
            raise ValueError(f"--out {out}: folder exists and is not a demo folder; pick another or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".demo").touch()
