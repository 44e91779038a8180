"""Stand-alone evaluation of a student: on held-out cache data (perplexity, KD loss, top-1 agreement, teacher mass),
or on plain token windows (`evaluate_windows`: loss and argmax predictions, what the demo's report uses).

    python -m distill.evaluate --student OUT [--cache EVAL_CACHE] [--dtype fp16|bf16|fp32] [--batch_size 8]

`--student` is a run folder (OUT, holding `student/` and `distill_config.yaml`) or an exported student folder (whose
parent may hold the run's `distill_config.yaml`). Given a run, the KD settings (kind, temperature, JSD beta, tail) and
the default cache (the run's --eval_cache) come from its `distill_config.yaml`, so the numbers match
the trainer's `eval_*` metrics; `--kd_kind` / `--temperature` override them. Runs without autocast, in the student's
own dtype (logits in fp32 inside the fused loss), so an fp16 student is measured as it will run. Prints a table
(`--json`: one JSON object). A student with another tokenizer than the cache's is evaluated through the
cross-tokenizer path (its precomputed store when `python -m distill.prepare_xtok` made one), as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache_tools.format.cli_args import StrictArgumentParser
from cache_tools.format.errors import ConfigError, run_cli
from cache_tools.format.schema import DTYPE_NAMES

if TYPE_CHECKING:  # torch is imported where it is used, so `--help` answers at once
    import torch

PROG = "python -m distill.evaluate"


class _LocalReduce:
    """`accelerator.reduce` for one process (the accumulator's interface)."""

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


def evaluate_student(
    student: Any,
    tokenizer: Any,
    cache_dir: str | Path | list[str],
    *,
    batch_size: int = 8,
    max_sequences: int | None = None,
    kd_config: Any = None,
    device: str | torch.device = "cpu",
    teacher_weights: Any = None,
) -> dict[str, float]:
    """Metrics of `student` (any dtype; left in it) on every sequence of `cache_dir` (or the first max_sequences).
    Returns {"ce", "perplexity", "kd", "top1_agreement", "teacher_mass_covered", "loss", "sequences"}, and for a
    cross-tokenizer student "xtok_aligned_fraction" and "xtok_mapped_mass_fraction". Several caches (one per
    teacher, over the same windows): "kd" is the mixture KD sum_i w_i kd_i (`teacher_weights`, default equal) and
    each teacher's metrics come as "teacher{i}/kd", "teacher{i}/top1_agreement", "teacher{i}/teacher_mass_covered"."""
    import torch

    with torch.no_grad():
        return _evaluate_student(student, tokenizer, cache_dir, batch_size, max_sequences, kd_config, device,
                                 teacher_weights)


def _evaluate_student(student: Any, tokenizer: Any, cache_dir: Any, batch_size: int, max_sequences: int | None,
                      kd_config: Any, device: Any, teacher_weights: Any) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from distill.data.dataset import XTOK_STATS, DistillCollator
    from distill.data.multi import build_multi_cache_data
    from distill.losses import KDConfig
    from distill.training.arguments import as_list
    from distill.training.metrics import MetricAccumulator
    from distill.training.modeling import DistillModel, head_rows, kd_config_for_caches
    from distill.training.teachers import parse_teacher_weights

    caches = as_list(cache_dir)
    data = build_multi_cache_data(caches, tokenizer, head_rows(student), eval_fraction=0.0)
    kd_configs = [kd_config_for_caches(kd_config or KDConfig(), readers) for readers in data.teacher_readers]
    weights_t = parse_teacher_weights(teacher_weights, len(caches))
    dataset = data.train
    if max_sequences is not None:
        for part in getattr(dataset, "datasets", [dataset]):
            part.indices = part.indices[:max_sequences]
    model = DistillModel(student, kd_configs[0], teacher_weights=weights_t,
                         teacher_kd_configs=kd_configs).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DistillCollator(pad))
    sums = MetricAccumulator()
    weights = {"ce": 1.0, "kd": 1.0}
    xtok = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        stats = batch.pop(XTOK_STATS, None)  # cross-tokenizer coverage sums: reported, not a model input
        if stats is not None:
            xtok += stats.sum(0)
        batch = {k: v.to(device) for k, v in batch.items()}
        sums.add_eval(model(**batch, loss_weights=weights))
    metrics = sums.eval_summary(_LocalReduce(), weights, weights_t)
    metrics["sequences"] = float(len(dataset))
    if float(xtok[0]) > 0:  # [student tokens, aligned, teacher mass, mapped mass]
        metrics["xtok_aligned_fraction"] = float(xtok[1] / xtok[0])
        metrics["xtok_mapped_mass_fraction"] = float(xtok[3] / xtok[2]) if float(xtok[2]) > 0 else 0.0
    return metrics


_ROWS = (  # (key, label, format) of the table, in reading order
    ("loss", "loss (weighted CE + KD)", "{:.4f}"),
    ("ce", "cross-entropy (nats/token)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("kd", "KD divergence (several teachers: to their weighted mixture)", "{:.4f}"),
    ("top1_agreement", "top-1 agreement with the teacher", "{:.2%}"),
    ("teacher_mass_covered", "teacher mass the student's top-k covers", "{:.2%}"),
    ("xtok_aligned_fraction", "student tokens aligned to teacher positions", "{:.2%}"),
    ("xtok_mapped_mass_fraction", "teacher mass mapped to student ids", "{:.2%}"),
    ("sequences", "sequences", "{:.0f}"),
    ("kd_kind", "KD kind", "{}"),
    ("temperature", "temperature", "{}"),
)


def format_table(metrics: dict[str, Any], title: str) -> str:
    """The metrics as an aligned two-column text table (known rows first, then any others)."""
    rows = [(label, fmt.format(metrics[key])) for key, label, fmt in _ROWS if key in metrics]
    known = {key for key, _, _ in _ROWS}
    rows += [(key, str(value)) for key, value in sorted(metrics.items()) if key not in known]
    width = max(len(label) for label, _ in rows)
    return "\n".join([title, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def evaluate_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> tuple[float, torch.Tensor]:
    """(mean next-token CE in nats/token, argmax predictions [W, L-1]) of a causal LM on full windows [W, L] of its
    own token ids, computed from fp32 logits. Models of different tokenizers are compared on their own windows; the
    argmax lets a caller measure top-1 agreement between models that read the same windows."""
    import torch

    with torch.no_grad():
        return _evaluate_windows(model, windows, batch_size)


def _evaluate_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    import torch

    was_training = model.training
    model.eval()
    total_nll, total_tokens, preds = 0.0, 0, []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()  # [b, L-1, V]: predicts tokens 1..L-1
        targets = batch[:, 1:]
        total_nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        total_tokens += targets.numel()
        preds.append(logits.argmax(-1))
    model.train(was_training)
    return total_nll / total_tokens, torch.cat(preds)


def run_settings(student: Path) -> tuple[Path, dict[str, Any]]:
    """(student model folder, the run's resolved config or {}) for `--student` given as a run folder or as an
    exported student folder inside one."""
    from distill.training.config import RESOLVED_CONFIG_NAME, load_yaml
    from distill.training.export import STUDENT_DIR

    model_dir = student / STUDENT_DIR if (student / STUDENT_DIR).is_dir() else student
    for folder in (student, model_dir.parent):
        if (folder / RESOLVED_CONFIG_NAME).is_file():
            return model_dir, load_yaml(folder / RESOLVED_CONFIG_NAME)
    return model_dir, {}


def kd_config_for(run: dict[str, Any], args: argparse.Namespace) -> Any:
    """The run's KD settings (every divergence parameter; defaults where it has none), with the command line's
    overrides. ConfigError (one line) for impossible values."""
    from types import SimpleNamespace

    from distill.losses import KDConfig

    flags = dict(run)
    if args.kd_kind:
        flags["kd_kind"] = args.kd_kind
    if args.temperature is not None:
        flags["temperature"] = args.temperature
    kd_config = KDConfig.from_args(SimpleNamespace(**flags))
    problems = kd_config.problems(flags=True)
    if problems:
        raise ConfigError("; ".join(problems))
    return kd_config


def _parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="run folder (OUT) or exported student folder")
    parser.add_argument("--cache", action="append", default=None,
                        help="held-out teacher cache (default: the run's eval cache); repeat it for several teachers "
                             "(one cache each, the same windows)")
    parser.add_argument("--teacher_weights", default=None,
                        help="weights of several teachers' KD, e.g. 0.6,0.4 (default: the run's, else equal)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_sequences", type=int, default=None)
    parser.add_argument("--kd_kind", default=None, help="override the run's KD divergence")
    parser.add_argument("--temperature", type=float, default=None, help="override the run's KD temperature")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, run = run_settings(Path(args.student))
    from distill.training.arguments import as_list

    cache = args.cache or as_list(run.get("eval_cache"))
    if not cache:
        raise ConfigError(f"--student {args.student}: no --cache given and the run has no --eval_cache to "
                          "evaluate on; pass --cache EVAL_CACHE")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--student {args.student}: no model here ({model_dir}/config.json missing); pass a run "
                          "folder or an exported student folder")
    kd_config = kd_config_for(run, args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPE_NAMES[args.dtype]))
    metrics = evaluate_student(student, tokenizer, cache, batch_size=args.batch_size,
                               max_sequences=args.max_sequences, kd_config=kd_config,
                               device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                               teacher_weights=args.teacher_weights or run.get("teacher_weights"))
    metrics["kd_kind"], metrics["temperature"] = kd_config.kind, kd_config.temperature
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    else:
        print(format_table(metrics, f"{model_dir} on {', '.join(map(str, cache))}:"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, lambda: _main(_parser().parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
