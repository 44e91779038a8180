"""`python -m distill.train --help`: our own flags first, grouped as the dataclasses that define them, then the
transformers TrainingArguments a distillation run usually sets, then the names of all the others (hundreds of
lines of help that bury ours otherwise). `--help-all` prints every flag with its help."""

from __future__ import annotations

import argparse
import textwrap

USAGE = "python -m distill.train [CONFIG.yaml] [--flag value ...]   (YAML keys = flags; the command line wins)"
GROUPS = {"ModelArguments": "student model", "DataArguments": "teacher cache / data",
          "LossArguments": "losses", "RunArguments": "run"}
COMMON_TRAINING = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "fp16", "bf16",
    "deepspeed", "use_cpu", "seed", "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "report_to", "dataloader_num_workers", "disable_tqdm",
)


def _first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text.split(". ")[0].rstrip(".") if text else ""


def format_help(*, full: bool = False) -> str:
    """The help text (`full`: every TrainingArguments flag with its own help, as HfArgumentParser prints it)."""
    from transformers import HfArgumentParser

    from distill.training.config import ARG_CLASSES

    if full:
        return HfArgumentParser(ARG_CLASSES, usage=USAGE).format_help()
    ours, training_class = ARG_CLASSES[:-1], ARG_CLASSES[-1]
    for cls in ours:  # HfArgumentParser puts a dataclass with this attribute in its own titled group
        cls._argument_group_name = GROUPS.get(cls.__name__, cls.__name__)
    parser = HfArgumentParser(ours, usage=USAGE, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    text = parser.format_help()
    training = HfArgumentParser([training_class])
    actions = {a.dest: a for a in training._actions if a.option_strings and a.dest != "help"}  # noqa: SLF001
    lines = ["", "training (transformers TrainingArguments; the ones a run usually sets):"]
    for name in COMMON_TRAINING:
        if name in actions:
            action = actions[name]
            lines.append(f"  --{name} (default {action.default}): {_first_sentence(action.help)}")
    others = sorted(name for name in actions if name not in COMMON_TRAINING)
    lines += ["", f"other TrainingArguments ({len(others)}; `python -m distill.train --help-all` shows their help):"]
    lines += textwrap.wrap(", ".join(f"--{n}" for n in others), width=118, initial_indent="  ", subsequent_indent="  ")
    return text + "\n".join(lines) + "\n"
