"""Cross-tokenizer target builder alone, before vs after the vectorised rewrite, in one process: the previous
implementation (kept verbatim as tests/xtok_reference.py) against `CrossTokenizerTargets`, on the loader
benchmark's cache (run `python -m bench --only loader` first) and, when ../shared exists, on the real Qwen3 ->
SmolLM2 pair over tinyshakespeare. Both are timed alternately on the same windows (CPU seconds of this process and
wall seconds), so a busy machine slows both alike; the outputs are also checked to be identical.

    python -m bench.xtok_builders [--windows N]
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, WORK_ROOT, apply_offline_env
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line


def _time(fn: Any, seqs: list[Any], rounds: int = 3) -> tuple[float, float]:
    """(CPU ms, wall ms) per window, best of `rounds` passes over `seqs`."""
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for s in seqs:
            fn(s)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return 1e3 * min(cpu) / len(seqs), 1e3 * min(wall) / len(seqs)


def compare(builder: Any, seqs: list[Any]) -> dict[str, float]:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import xtok_reference as ref

    for s in seqs:
        got, want = builder(s), ref.reference_targets(builder, s)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want if k != "stats"), "outputs differ"
    before = _time(lambda s: ref.reference_targets(builder, s), seqs)
    after = _time(builder, seqs)
    return {"before_cpu_ms": before[0], "after_cpu_ms": after[0], "before_wall_ms": before[1],
            "after_wall_ms": after[1], "speedup_cpu": before[0] / after[0], "windows": len(seqs),
            "mean_teacher_tokens": float(np.mean([s.length for s in seqs]))}


def main(argv: list[str] | None = None) -> None:
    parser = StrictArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=24)
    args = parse_command_line(parser, argv)
    apply_offline_env()
    from transformers import AutoTokenizer

    from cache_tools.format.reader import TeacherCacheReader
    from distill.data.xtok.pipeline import CrossTokenizerTargets
    from examples.tiny_models import stdlib_docstrings, train_bpe_tokenizer

    results: dict[str, Any] = {}
    cache = WORK_ROOT / "loader" / "cache-512-256-300"
    if (cache / "manifest.json").is_file():
        reader = TeacherCacheReader(cache)
        teacher = AutoTokenizer.from_pretrained(str(next((WORK_ROOT / "loader" / "assets").glob("*/tokenizer"))))
        student = train_bpe_tokenizer(stdlib_docstrings(max_docs=300), 384, split_digits=True)
        builder = CrossTokenizerTargets(reader, teacher, student, max_length=0)  # uncapped, like the reference
        results["bench cache (512-token windows, K=256, tiny BPE 512 -> 384)"] = compare(
            builder, [reader[i] for i in range(min(args.windows, len(reader)))])
    shared = REPO_ROOT.parent / "shared"
    if (shared / "tokenizers" / "qwen3").is_dir() and (shared / "data" / "tinyshakespeare.txt").is_file():
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from xtok_fixtures import write_text_cache

        qwen = AutoTokenizer.from_pretrained(str(shared / "tokenizers" / "qwen3"))
        smol = AutoTokenizer.from_pretrained(str(shared / "tokenizers" / "smollm2"))
        text = (shared / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        out = WORK_ROOT / "xtok_real" / "cache"
        if not (out / "manifest.json").is_file():
            docs = [d for d in text.split("\n\n") if d.strip()][:2000]
            write_text_cache(out, qwen, docs, max_length=512, top_k=256, shard_size=32,
                             max_sequences=args.windows, name_or_path=str(shared / "tokenizers" / "qwen3"))
        reader = TeacherCacheReader(out)
        builder = CrossTokenizerTargets(reader, qwen, smol, max_length=0)
        results["Qwen3 -> SmolLM2, tinyshakespeare (512-token windows, K=256, synthetic teacher)"] = compare(
            builder, [reader[i] for i in range(min(args.windows, len(reader)))])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
