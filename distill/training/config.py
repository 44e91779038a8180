"""Run configuration: dataclasses parsed by `HfArgumentParser` from a YAML file plus command-line overrides.

`parse_config(argv)` is the one entry point: YAML keys become argparse defaults, so every `--key value` on the command
line wins over the file. Unknown keys (in either place) are a one-line `ConfigError` naming the key. `validate()` then
collects every problem and raises once, listing all of them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from cache_tools.format.cli_args import option_strings, unknown_options_message, with_suggestions
from cache_tools.format.errors import ConfigError
from cache_tools.format.fsutil import atomic_write_text
from distill.data.packing import PACKING_MODES
from distill.data.xtok.vocab_map import RULES as XTOK_RULES
from distill.losses import KD_KINDS, KDConfig
from distill.losses.schedules import parse_ramp
from distill.training.arguments import (
    ARG_CLASSES,
    DataArguments,
    DistillConfig,
    DistillTrainingArguments,
    LossArguments,
    ModelArguments,
    RunArguments,
    as_list,
)
from distill.training.components import COMPONENTS
from distill.training.teachers import parse_teacher_weights

RESOLVED_CONFIG_NAME = "distill_config.yaml"
__all__ = ["ARG_CLASSES", "KD_KINDS", "RESOLVED_CONFIG_NAME", "DataArguments", "DistillConfig",
           "DistillTrainingArguments", "LossArguments", "ModelArguments", "RunArguments", "load_yaml", "parse_config",
           "student_pool_layers", "validate", "write_resolved_config"]


def _known_keys() -> set[str]:
    return {f.name for cls in ARG_CLASSES for f in dataclasses.fields(cls) if f.init}


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML config ({type(err).__name__}); fix the file") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of key: value")
    return data


def parse_config(argv: list[str]) -> DistillConfig:
    """`[CONFIG.yaml] [--key value ...]` -> DistillConfig (CLI wins over YAML). Raises ConfigError on unknown keys
    or values argparse rejects; call `validate()` afterwards for the semantic checks."""
    yaml_values: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        yaml_path, argv = argv[0], argv[1:]
        yaml_values = load_yaml(yaml_path)
        unknown = sorted(set(yaml_values) - _known_keys())
        if unknown:
            raise ConfigError(f"{yaml_path}: unknown config key(s) {with_suggestions(unknown, _known_keys())}; see "
                              "`python -m distill.train --help` for the valid keys")
    parser = HfArgumentParser(ARG_CLASSES, allow_abbrev=False)  # a prefix of a flag is refused, never guessed
    # YAML values become argparse defaults so that any flag on the command line overrides them.
    # (argparse applies `type` only to string defaults; lists such as report_to and scalars are kept as given.)
    parser.set_defaults(**yaml_values)
    # Argparse prints usage + exits on a bad value; turn that into our one-line error instead.
    parser.error = _raise_config_error  # type: ignore[method-assign]
    try:
        *groups, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                                look_for_args_file=False)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid configuration: {_first_line(err)}") from err
    if remaining:
        raise ConfigError(unknown_options_message(remaining, option_strings(parser), "python -m distill.train --help"))
    return DistillConfig(*groups)


def _raise_config_error(message: str) -> None:
    raise ConfigError(f"invalid command line: {message}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validate(cfg: DistillConfig) -> None:
    """Check the whole configuration; raise ONE ConfigError listing every problem found."""
    problems: list[str] = []
    m, d, loss, run, t = cfg.model, cfg.data, cfg.loss, cfg.run, cfg.training
    if not m.student and not m.student_config:
        problems.append("--student (or --student_config) is required")
    if m.student and m.student_config:
        problems.append("give --student or --student_config, not both")
    if m.student_config and not (m.tokenizer or m.student):
        problems.append("--student_config needs --tokenizer")
    if m.student_config and not Path(m.student_config).exists():
        problems.append(f"--student_config {m.student_config}: no such file")
    if not d.cache and not d.dataset:
        problems.append("--cache DIR (distillation) or --dataset SPEC (LM-only) is required")
    if d.cache and d.dataset:
        problems.append("give --cache or --dataset, not both")
    problems += _teacher_problems(d)
    if d.dataset and (d.eval_cache or d.eval_fraction):
        problems.append("--eval_cache/--eval_fraction need --cache (LM-only mode has no held-out targets)")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"--eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.xtok_rule not in XTOK_RULES:
        problems.append(f"--xtok_rule {d.xtok_rule}: use {' or '.join(XTOK_RULES)}")
    if d.eval_cache and d.eval_fraction:
        problems.append("give --eval_cache or --eval_fraction, not both")
    if d.max_length < 2:
        problems.append(f"--max_length must be >= 2, got {d.max_length}")
    if d.packing is not None and d.packing not in PACKING_MODES:
        problems.append(f"--packing {d.packing}: use {' or '.join(PACKING_MODES)}")
    if d.dataset and d.assistant_only_loss:
        problems.append("--assistant_only_loss true needs a conversational --cache (--dataset is plain text)")
    if d.student_chat_template and not Path(d.student_chat_template).is_file():
        problems.append(f"--student_chat_template {d.student_chat_template}: no such file")
    if not t.output_dir:
        problems.append("--output_dir is required")
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append(f"--max_steps {t.max_steps}: give a positive number of optimizer steps, or -1 (the default) "
                        "to train --num_train_epochs epochs")
    problems += _component_problems(cfg)
    problems += KDConfig.from_args(loss).problems(flags=True)  # --kd_kind, --temperature, --jsd_beta, ...
    if loss.max_nonfinite_steps < 1:
        problems.append(f"--max_nonfinite_steps must be >= 1, got {loss.max_nonfinite_steps}")
    if run.early_stopping_patience < 0:
        problems.append(f"--early_stopping_patience must be >= 0, got {run.early_stopping_patience}")
    if run.early_stopping_patience and not (d.eval_cache or d.eval_fraction):
        problems.append("--early_stopping_patience needs evaluation data (--eval_cache or --eval_fraction)")
    if run.early_stopping_patience and str(getattr(t.eval_strategy, "value", t.eval_strategy)) == "no":
        problems.append("--early_stopping_patience needs evaluations: set --eval_strategy steps (and --eval_steps)")
    if m.pool_student_layers:
        try:
            [int(x) for x in m.pool_student_layers.split(",")]
        except ValueError:
            problems.append(f"--pool_student_layers must be comma-separated integers, got {m.pool_student_layers!r}")
    if t.fp16 and t.bf16:
        problems.append("give --fp16 or --bf16, not both")
    if problems:
        raise ConfigError(f"{len(problems)} configuration problem(s): " + "; ".join(problems))


def _teacher_problems(d: Any) -> list[str]:
    """Several --cache (teachers): their weights, and one --eval_cache per teacher when eval caches are given."""
    caches, evals = as_list(d.cache), as_list(d.eval_cache)
    problems = []
    if len(evals) > 1 and len(evals) != len(caches):
        problems.append(f"{len(caches)} --cache but {len(evals)} --eval_cache: give one eval cache per teacher, in "
                        "the same order")
    if len(caches) > 1 and len(evals) == 1:
        problems.append(f"{len(caches)} --cache but 1 --eval_cache: give one eval cache per teacher (the same held-out "
                        "windows built by each teacher), in the same order")
    if d.teacher_weights is not None and caches:
        try:
            parse_teacher_weights(d.teacher_weights, len(caches))
        except ConfigError as err:
            problems.append(str(err))
    elif d.teacher_weights is not None:
        problems.append("--teacher_weights needs --cache (one weight per teacher cache)")
    return problems


def _component_problems(cfg: DistillConfig) -> list[str]:
    """Weights, schedules and parameters of every registered loss component."""
    loss, problems = cfg.loss, []
    for c in COMPONENTS:
        weight = getattr(loss, c.weight_field)
        if not math.isfinite(weight) or weight < 0:
            problems.append(f"--{c.weight_field} must be a finite number >= 0, got {weight}")
        try:
            parse_ramp(getattr(loss, c.schedule_field))
        except ValueError as err:
            problems.append(f"--{c.schedule_field}: {err}")
        for p in c.params:
            value = getattr(loss, p.name)
            if not math.isfinite(value) or (p.positive and not value > 0):
                problems.append(f"--{p.name} must be a finite number{' > 0' if p.positive else ''}, got {value}")
    teacher_flags = [c.weight_field for c in COMPONENTS if c.needs_teacher and getattr(loss, c.weight_field)]
    if cfg.data.dataset and teacher_flags:
        # LM-only mode has no teacher: non-zero teacher weights would silently do nothing.
        problems.append("--dataset (LM-only) trains with CE only: set " + " ".join(f"--{f} 0" for f in teacher_flags))
    if all(getattr(loss, c.weight_field) == 0 for c in COMPONENTS):
        problems.append("every loss weight is 0: nothing to train")
    return problems


def student_pool_layers(spec: str | None) -> list[int] | None:
    return [int(x) for x in spec.split(",")] if spec else None


def write_resolved_config(cfg: DistillConfig, output_dir: str | Path) -> Path:
    """Write every resolved value as YAML into `output_dir` (temp + rename); re-running with it reproduces the run."""
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=True))
    return path


def _plain(value: Any) -> Any:
    """Enums and other objects -> YAML-safe scalars."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))
