"""Run configuration: dataclasses parsed by `HfArgumentParser` from a YAML file plus command-line overrides.

`parse_config(argv)` is the one entry point: YAML keys become argparse defaults, so every `--key value` on the command
line wins over the file. Unknown keys (in either place) are a one-line `ConfigError` naming the key. `validate()` then
collects every problem and raises once, listing all of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from cache_tools.format.errors import ConfigError
from cache_tools.format.fsutil import atomic_write_text
from distill.data.packing import PACKING_MODES
from distill.data.xtok.vocab_map import RULES as XTOK_RULES
from distill.losses import DEFAULT_CHUNK_SIZE, KD_KINDS, KDConfig
from distill.losses.schedules import parse_ramp
from distill.training.components import COMPONENTS

RESOLVED_CONFIG_NAME = "distill_config.yaml"



@dataclass
class ModelArguments:
    student: str | None = field(default=None, metadata={"help": "Student model: hub id or local directory."})
    student_config: str | None = field(
        default=None,
        metadata={"help": "Start from a randomly initialised model of this config.json (instead of --student)."},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Student tokenizer (hub id or dir); defaults to --student."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model/tokenizer code from the hub. Off unless you trust the source."}
    )
    pool_student_layers: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated student hidden_states indices (0 = embeddings) to pool for the feature and "
            "contrastive losses; default: mapped from the teacher's pooled layers by relative depth."
        },
    )


@dataclass
class DataArguments:
    cache: str | None = field(default=None, metadata={"help": "Teacher cache directory (distillation mode)."})
    eval_cache: str | None = field(default=None, metadata={"help": "Separate held-out cache for evaluation."})
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the cache's shards (the last ones) for evaluation."},
    )
    max_eval_sequences: int | None = field(default=None, metadata={"help": "Cap on evaluation sequences."})
    verify_cache: bool = field(
        default=False,
        metadata={"help": "Before training, verify --cache and --eval_cache (`cache_tools verify`: sha256 of every "
                          "shard + value checks; reads every shard once) and stop at the first fault."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "LM-only mode without a cache: a text dataset spec (local file/folder or hub name)."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of --dataset."})
    max_length: int = field(default=512, metadata={"help": "Window length (tokens) for --dataset."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many documents of --dataset."})
    packing: str | None = field(
        default=None,
        metadata={"help": "isolated (no token attends to another document of its window: per-document positions and a "
                          "block-diagonal causal mask) or cross_document. With --cache the student follows the cache's "
                          "recorded packing (this flag may only repeat it); with --dataset the default is "
                          "cross_document."},
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "CE and KD only where the predicted token is assistant / completion content (and, for KD, "
                          "the cache stores targets). Default: true on conversational caches; false trains CE on "
                          "every token. Plain-text caches have no assistant mask (true is an error there)."},
    )
    student_chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template FILE the student renders cached conversations with when its "
                          "tokenizer differs from the teacher's (default: the student tokenizer's own template)."},
    )
    xtok_rule: str = field(
        default="first_token",
        metadata={"help": "When the student tokenizer differs from the cache's: teacher tokens with no exact student "
                          "twin go to first_token (the student token their text begins with) or tail (their mass "
                          "moves into the tail bucket)."},
    )


SCHEDULE_HELP = ("Ramp of the {name} weight (weight = base x ramp): constant | KIND:START:END[:FROM:TO] with KIND "
                 "linear|cosine, START/END fractions of max_steps or steps like 500s.")


def _component_fields() -> list[tuple[str, type, Any]]:
    """`{c}_weight`, `{c}_schedule` and each parameter of every registered loss component (see components.py)."""
    weights = [(c.weight_field, float, field(default=c.default_weight, metadata={"help": c.help}))
               for c in COMPONENTS]
    schedules = [(c.schedule_field, str, field(default="constant",
                                               metadata={"help": SCHEDULE_HELP.format(name=c.name)}))
                 for c in COMPONENTS]
    params = [(p.name, float, field(default=p.default, metadata={"help": p.help}))
              for c in COMPONENTS for p in c.params]
    return weights + schedules + params


# Generated from the registry, so a new component needs no edit here.
ComponentArguments = dataclasses.make_dataclass("ComponentArguments", _component_fields())


@dataclass
class LossArguments(ComponentArguments):
    kd_kind: str = field(default="forward_kl", metadata={"help": "KD divergence: " + "|".join(KD_KINDS)})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature T (loss scaled by T^2)."})
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight of JSD(beta)."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew of skew_kl: KL(p || alpha p + (1 - alpha) q)."})
    use_tail: bool = field(default=True, metadata={"help": "Tail bucket for the mass outside the teacher's top-k."})
    loss_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Rows per chunk of the fused CE+KD loss (memory ~ 3 x chunk x vocab x 4 bytes; 256 measured "
                          "as fast as 1024 with a third of the memory, see bench/bench_loss.py)."},
    )
    max_nonfinite_steps: int = field(
        default=10, metadata={"help": "Abort after this many non-finite losses in a row (each one is skipped)."}
    )


@dataclass
class RunArguments:
    early_stopping_patience: int = field(
        default=0, metadata={"help": "Stop after this many evaluations without improvement (0 = off)."}
    )
    early_stopping_min_delta: float = field(default=0.0, metadata={"help": "Smallest improvement that counts."})
    early_stopping_warmup_steps: int = field(default=0, metadata={"help": "No early stop before this global step."})
    early_stopping_metric: str = field(default="eval_loss", metadata={"help": "Metric watched (lower is better)."})
    console_log: bool = field(default=True, metadata={"help": "Print one summary line per logging step."})


@dataclass
class DistillTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults suited to distillation (TensorBoard, custom batch keys kept, frequent logs)."""

    report_to: None | str | list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "Integrations to log to."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the teacher-target keys the model signature does not list."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "On resume, restore callback state (early stopping's best value and patience)."}
    )


ARG_CLASSES = (ModelArguments, DataArguments, LossArguments, RunArguments, DistillTrainingArguments)


@dataclass
class DistillConfig:
    """The parsed run configuration, one attribute per argument group."""

    model: ModelArguments
    data: DataArguments
    loss: LossArguments
    run: RunArguments
    training: DistillTrainingArguments

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group in (self.model, self.data, self.loss, self.run):
            out.update(dataclasses.asdict(group))
        known = {f.name for f in dataclasses.fields(DistillTrainingArguments)}
        out.update({k: v for k, v in self.training.to_dict().items() if k in known})
        return out


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
            raise ConfigError(f"{yaml_path}: unknown config key(s) {', '.join(unknown)}; see `python -m distill.train "
                              "--help` for the valid keys")
    parser = HfArgumentParser(ARG_CLASSES)
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
        raise ConfigError(f"unknown option(s) {' '.join(remaining)}; see `python -m distill.train --help`")
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
    if d.dataset and (d.eval_cache or d.eval_fraction):
        problems.append("--eval_cache/--eval_fraction need --cache (LM-only mode has no held-out targets)")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"--eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.packing is not None and d.packing not in PACKING_MODES:
        problems.append(f"--packing {d.packing}: use {' or '.join(PACKING_MODES)}")
    if d.dataset and d.assistant_only_loss:
        problems.append("--assistant_only_loss true needs a conversational --cache (--dataset is plain text)")
    if d.student_chat_template and not Path(d.student_chat_template).is_file():
        problems.append(f"--student_chat_template {d.student_chat_template}: no such file")
    if d.xtok_rule not in XTOK_RULES:
        problems.append(f"--xtok_rule {d.xtok_rule}: use {' or '.join(XTOK_RULES)}")
    if d.eval_cache and d.eval_fraction:
        problems.append("give --eval_cache or --eval_fraction, not both")
    if d.max_length < 2:
        problems.append(f"--max_length must be >= 2, got {d.max_length}")
    if not t.output_dir:
        problems.append("--output_dir is required")
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
