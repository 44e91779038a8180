"""The run's argument groups: dataclasses `HfArgumentParser` fills from YAML + command line (`distill.training.config`
parses and validates them). The loss components' and the divergences' flags are generated from their registries."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from distill.losses import DEFAULT_CHUNK_SIZE, KD_KINDS
from distill.losses.divergences import PARAMS
from distill.training.components import COMPONENTS


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


class RepeatableFlag(argparse.Action):
    """`--cache A` gives "A" (as a single flag always did); `--cache A --cache B` gives ["A", "B"]. The first use on
    the command line replaces a YAML value (the command line wins), later uses append."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = False

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None) if self.seen else None
        self.seen = True
        if current is None:
            setattr(namespace, self.dest, values)
        else:
            setattr(namespace, self.dest, [*as_list(current), values])


def as_list(value: str | list[str] | None) -> list[str]:
    """A repeatable flag's value (None, one path, or a list) as a list of paths."""
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


@dataclass
class DataArguments:
    cache: str | None = field(default=None, metadata={
        "help": "Teacher cache directory (distillation mode). Several teachers: repeat it (--cache A --cache B; YAML: "
                "a list); their caches must cover the same windows.", "action": RepeatableFlag})
    eval_cache: str | None = field(default=None, metadata={
        "help": "Separate held-out cache for evaluation; with several --cache, one per teacher in the same order.",
        "action": RepeatableFlag})
    teacher_weights: str | None = field(default=None, metadata={
        "help": "Weights of the teachers' KD terms, one per --cache: 0.6,0.4 (YAML: a list); normalised to sum 1; "
                "default: equal."})
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
                          "isolated."},
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


def _divergence_fields() -> list[tuple[str, type, Any]]:
    """One flag per divergence parameter of the registry (`distill.losses.divergences.PARAMS`), same name."""
    return [(p.name, float, field(default=p.default, metadata={"help": p.help})) for p in PARAMS.values()]


# Generated from the registries, so a new component or divergence parameter needs no edit here.
RegistryArguments = dataclasses.make_dataclass("RegistryArguments", _component_fields() + _divergence_fields())


@dataclass
class LossArguments(RegistryArguments):
    kd_kind: str = field(default="forward_kl", metadata={"help": "KD divergence: " + "|".join(KD_KINDS)})
    temperature: float = field(default=1.0, metadata={"help": "KD temperature T (loss scaled by T^2)."})
    use_tail: bool = field(default=True, metadata={"help": "Tail bucket for the mass outside the teacher's top-k."})
    loss_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Rows per chunk of the fused CE+KD loss (memory ~ 3 x chunk x vocab x 4 bytes; the default "
                          "is the smallest chunk as fast as larger ones, see docs/RESULTS.md)."},
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
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into an --output_dir that holds a finished or started run, replacing "
                                         "its student and config (without it such a folder is refused)."}
    )


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
