"""Stand-alone evaluation of a student on held-out cache data: perplexity, KD loss, top-1 agreement, teacher mass.

    python -m distill.evaluate --student OUT/student --cache EVAL_CACHE [--dtype fp16|bf16|fp32] [--batch_size 8]

Runs without autocast, in the student's own dtype (logits in fp32 inside the fused loss), so an fp16 student is
measured as it will run. Prints one JSON object. The same numbers as the trainer's `eval_*` metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _LocalReduce:
    """`accelerator.reduce` for one process (the accumulator's interface)."""

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


@torch.no_grad()
def evaluate_student(
    student: Any,
    tokenizer: Any,
    cache_dir: str | Path,
    *,
    batch_size: int = 8,
    max_sequences: int | None = None,
    kd_config: Any = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Metrics of `student` (any dtype; left in it) on every sequence of `cache_dir` (or the first max_sequences).
    Returns {"ce", "perplexity", "kd", "top1_agreement", "teacher_mass_covered", "loss", "sequences"}."""
    from torch.utils.data import DataLoader

    from distill.data.dataset import DistillCollator, build_cache_data
    from distill.losses import KDConfig
    from distill.training.metrics import MetricAccumulator
    from distill.training.modeling import DistillModel, head_rows

    data = build_cache_data(cache_dir, tokenizer, head_rows(student), eval_fraction=0.0)
    dataset = data.train
    if max_sequences is not None:
        dataset.indices = dataset.indices[:max_sequences]
    model = DistillModel(student, kd_config or KDConfig()).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DistillCollator(pad))
    sums = MetricAccumulator()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        sums.add_eval(model(**batch, loss_weights={"ce": 1.0, "kd": 1.0}))
    metrics = sums.eval_summary(_LocalReduce(), {"ce": 1.0, "kd": 1.0})
    metrics["sequences"] = float(len(dataset))
    return metrics


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache_tools.schema import CacheError

    parser = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="exported student directory (or hub id)")
    parser.add_argument("--cache", required=True, help="held-out teacher cache directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_sequences", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.student)
        student = AutoModelForCausalLM.from_pretrained(args.student, dtype=DTYPES[args.dtype])
        metrics = evaluate_student(student, tokenizer, args.cache, batch_size=args.batch_size,
                                   max_sequences=args.max_sequences, device=args.device)
    except (CacheError, OSError) as err:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
