"""Fused chunked CE + KD vs the naive full-logit CE + KD: peak memory and time of forward + backward.

    python -m bench.bench_loss [--quick] [--device cpu|cuda] [--chunks 256,512,1024]

Goals: peak-memory ratio (fused / naive) <= 0.10, time ratio <= 1.2, both measured in the same run, at N = 8192.
--quick (N = 1024) only checks that everything runs: the fused kernel's fixed [V, H] fp32 grad_weight buffer is
then a large share of its peak, so its memory ratio (~0.14) says little about N = 8192 (~0.02).
Time: the best of the timed steps after a warm-up; wall clock on cuda, process CPU time on cpu (the CPU is often
shared, and CPU time of all threads measures the work regardless of what else runs).
Memory counts only what the loss adds on top of its inputs (hidden, weight, targets are allocated first):
- cuda: torch.cuda.max_memory_allocated() minus memory_allocated() once the inputs exist.
- cpu: every variant runs in a fresh subprocess (so no allocator cache or earlier peak leaks in); the peak resident
  set (VmHWM, reset through /proc/self/clear_refs after the inputs exist when the kernel allows it, else ru_maxrss)
  minus the resident set at that point. RSS counts pages actually touched, which is what the loss costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line
from distill.losses import DEFAULT_CHUNK_SIZE, KDConfig, fused_ce_kd_loss, naive_ce_kd_loss

HIDDEN, TOP_K = 576, 256
MEMORY_GOAL, TIME_GOAL = 0.10, 1.2


def make_inputs(n: int, vocab: int, device: str, dtype: torch.dtype, seed: int = 0) -> tuple:
    """Random inputs of the benchmark's shape; unique ids per row without any [N, V] temporary."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, HIDDEN, generator=gen) * 0.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(vocab, HIDDEN, generator=gen) * 0.05).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    ids = ((start + torch.arange(TOP_K) * (vocab // TOP_K)) % vocab).to(device)
    masses = torch.randn(n, TOP_K + 1, generator=gen).mul(2).log_softmax(-1)
    logprobs, _ = masses[:, :TOP_K].sort(-1, descending=True)
    kd_mask = torch.ones(n, dtype=torch.bool, device=device)
    return hidden, weight, labels, ids, logprobs.to(device), masses[:, TOP_K].to(device), kd_mask


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure(variant: str, n: int, vocab: int, chunk: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Run forward + backward `repeats` + 1 times (the first is a warm-up); return seconds per step and peak MiB."""
    hidden, weight, *targets = make_inputs(n, vocab, device, dtype)
    fn = fused_ce_kd_loss if variant == "fused" else naive_ce_kd_loss
    cfg = KDConfig(chunk_size=max(chunk, 1))  # the naive variant ignores it
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_ok = _reset_peak_rss()
        base_rss = _rss_kib("VmRSS")
        base_peak = _rss_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = [], []
    for i in range(repeats + 1):
        hidden.grad = weight.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        fn(hidden, weight, *targets, config=cfg).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Without clear_refs the high-water mark may predate the inputs; the delta over it is then a lower bound.
        peak_mib = (peak - (base_rss if reset_ok else base_peak)) / 1024
    # On a shared CPU, process time (all threads) is the fair measure of work; wall time is kept for reference.
    seconds = min(wall) if device == "cuda" else min(cpu)
    return {"variant": variant, "chunk": chunk, "seconds": seconds, "wall_s": min(wall), "peak_mib": peak_mib}


def _measure_in_subprocess(variant: str, n: int, vocab: int, chunk: int, dtype: str, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_loss", "--worker", variant, "--n", str(n), "--vocab", str(vocab)]
    cmd += ["--chunks", str(chunk), "--dtype", dtype, "--repeats", str(repeats), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {variant} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024
    except (OSError, StopIteration):
        return float("inf")


def run(quick: bool, device: str, chunks: list[int] | None = None, dtype: str = "float32") -> dict:
    """Benchmark both variants; returns {"cases": [...], "goals": {...}} with ratios fused / naive."""
    n = 1024 if quick else 8192
    vocabs = [49152] if quick else [49152, 151936]
    chunks = chunks or [DEFAULT_CHUNK_SIZE]
    repeats = 1 if quick else 2
    cases = []
    for vocab in vocabs:
        # The naive variant peaks at about six [N, V] fp32 tensors (measured: 1234 MiB at N=1024, V=49152).
        naive_need = 6 * n * vocab * 4 / 2**20
        variants = [("fused", c) for c in chunks]
        if device == "cuda" or naive_need < 0.6 * _available_mib():
            variants.insert(0, ("naive", 0))
        results = []
        for variant, chunk in variants:
            if device == "cpu":
                results.append(_measure_in_subprocess(variant, n, vocab, chunk, dtype, repeats))
            else:
                results.append(measure(variant, n, vocab, chunk or 1, device, getattr(torch, dtype), repeats))
                torch.cuda.empty_cache()
        naive = results.pop(0) if variants[0][0] == "naive" else None
        for fused in results:
            case = {"n": n, "vocab": vocab, "hidden": HIDDEN, "top_k": TOP_K, "chunk": fused["chunk"]}
            case.update(fused_s=fused["seconds"], fused_peak_mib=fused["peak_mib"])
            if naive is None:
                case["skipped"] = f"naive needs ~{naive_need:.0f} MiB of RAM, more than 60% of what is available"
            else:
                case.update(naive_s=naive["seconds"], naive_peak_mib=naive["peak_mib"])
                case["time_ratio"] = fused["seconds"] / naive["seconds"]
                case["memory_ratio"] = fused["peak_mib"] / max(naive["peak_mib"], 1e-9)
            cases.append(case)
    ratios = {}  # the shape `python -m bench` tabulates: {figure: {value, goal, met}}
    for case in cases:
        if "skipped" not in case:
            tag = f"N={case['n']} V={case['vocab']} chunk={case['chunk']}"
            mem, tim = case["memory_ratio"], case["time_ratio"]
            # The memory goal is stated at N = 8192; at --quick's N = 1024 the fixed [V, H] buffer dominates.
            met = mem <= MEMORY_GOAL if case["n"] >= 8192 else None
            ratios[f"memory {tag}"] = {"value": mem, "goal": f"<= {MEMORY_GOAL} at N=8192", "met": met}
            ratios[f"time {tag}"] = {"value": tim, "goal": f"<= {TIME_GOAL}", "met": tim <= TIME_GOAL}
    goals = {"memory_ratio": MEMORY_GOAL, "time": TIME_GOAL}
    return {"device": device, "dtype": dtype, "cases": cases, "ratios": ratios, "goals": goals}


def main(argv: list[str] | None = None) -> int:
    parser = StrictArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1024 rows, vocab 49,152 only (seconds)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunks", default=str(DEFAULT_CHUNK_SIZE), help="comma-separated fused chunk sizes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parse_command_line(parser, argv)
    try:
        chunks = [int(c) for c in args.chunks.split(",")]
    except ValueError:
        parser.error(f"--chunks {args.chunks!r}: give comma-separated integers, e.g. 256,512")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.worker:
        dtype = getattr(torch, args.dtype)
        print(json.dumps(measure(args.worker, args.n, args.vocab, chunks[0], args.device, dtype, args.repeats)))
        return 0
    report = run(args.quick, args.device, chunks, args.dtype)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"bench_loss on {report['device']} ({args.dtype}, OMP_NUM_THREADS={threads}), H={HIDDEN}, K={TOP_K}")
    for case in report["cases"]:
        head = f"  N={case['n']} V={case['vocab']} chunk={case['chunk']}: "
        fused = f"fused {case['fused_s']:.2f}s {case['fused_peak_mib']:.0f} MiB"
        if "skipped" in case:
            print(f"{head}{fused} | naive skipped ({case['skipped']})")
            continue
        print(
            f"{head}naive {case['naive_s']:.2f}s {case['naive_peak_mib']:.0f} MiB | {fused} | "
            f"memory ratio {case['memory_ratio']:.3f} (goal <= {MEMORY_GOAL}) "
            f"time ratio {case['time_ratio']:.2f} (goal <= {TIME_GOAL})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
