"""Entry point: `python -m distill.train CONFIG.yaml [--key value ...]` (or under `accelerate launch` / `torchrun`).

Distillation: `--student S --cache DIR --output_dir OUT`. LM-only (no cache, CE only, e.g. to pretrain a small
teacher): `--student_config config.json --tokenizer DIR --dataset file.txt --kd_weight 0 --output_dir OUT`.
Bad input -> one line on stderr naming the file/flag and the fix, exit code 2 (`errors.run_cli`); nothing
half-written.

`build_trainer(cfg)` assembles the same pieces for benchmarks and tests.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_tools.format.errors import ConfigError, run_cli

PROG = "python -m distill.train"


@dataclass
class Built:
    trainer: Any  # DistillTrainer
    tokenizer: Any
    model: Any  # DistillModel
    data: Any  # distill.data.BuiltData


def load_tokenizer(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.student
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer {source}: cannot load a tokenizer ({type(err).__name__}); pass a tokenizer "
                          "directory or hub id") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of every loss; any id will do
    return tok


def load_student_config(cfg: Any) -> Any:
    """The student's config alone (cheap): lets us check the cache against the student before loading weights."""
    from transformers import AutoConfig

    source = cfg.model.student_config or cfg.model.student
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        flag = "--student_config" if cfg.model.student_config else "--student"
        raise ConfigError(f"{flag} {source}: cannot load the model config ({type(err).__name__}); pass a model "
                          "directory, a config.json or a hub id") from err


def load_student(cfg: Any, tokenizer: Any, config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from distill.training.modeling import head_rows

    trust = cfg.model.trust_remote_code
    try:
        if cfg.model.student_config:
            set_seed(cfg.training.seed)  # random init must be reproducible across ranks and runs
            student = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=torch.float32)
        else:
            student = AutoModelForCausalLM.from_pretrained(cfg.model.student, trust_remote_code=trust,
                                                           dtype=torch.float32)
    except (OSError, ValueError) as err:
        flag = "--student_config" if cfg.model.student_config else "--student"
        raise ConfigError(f"{flag} {cfg.model.student_config or cfg.model.student}: cannot load the student "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from err
    rows = head_rows(student)
    if len(tokenizer) > rows:
        raise ConfigError(f"--tokenizer: {len(tokenizer)} tokens but the student's LM head has {rows} rows; use a "
                          "matching tokenizer or resize the student")
    return student


def build_trainer(cfg: Any, *, target_builder: Any = None, extra_callbacks: list[Any] | None = None) -> Built:
    """Tokenizer + student + data + DistillModel + DistillTrainer (callbacks installed), ready for `.train()`."""
    from distill.data.dataset import DistillCollator
    from distill.training.preflight import check_student_context
    from distill.training.trainer import DistillTrainer

    tokenizer = load_tokenizer(cfg)
    student_config = load_student_config(cfg)
    # Check the data against the student's vocabulary BEFORE loading (possibly billions of) weights.
    rows = int(student_config.get_text_config().vocab_size)
    data = _build_data(cfg, tokenizer, rows, target_builder)
    check_student_context(student_config, "--student_config" if cfg.model.student_config else "--student",
                          data.readers, None if cfg.data.cache else cfg.data.max_length)
    model = _build_model(cfg, tokenizer, student_config, rows, data)
    trainer = DistillTrainer(
        model=model, args=cfg.training, data_collator=DistillCollator(tokenizer.pad_token_id),
        train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer, loss_args=cfg.loss,
    )
    _install_callbacks(trainer, cfg, extra_callbacks or [])
    return Built(trainer, tokenizer, model, data)


def _build_data(cfg: Any, tokenizer: Any, rows: int, target_builder: Any) -> Any:
    """The training/eval data: one cache, several caches (several teachers), or LM-only text."""
    from distill.data.dataset import build_cache_data, build_text_data
    from distill.data.multi import build_multi_cache_data
    from distill.training.arguments import as_list

    d = cfg.data
    caches = as_list(d.cache)
    options = dict(eval_fraction=d.eval_fraction, max_eval_sequences=d.max_eval_sequences,
                   target_builder=target_builder, xtok_rule=d.xtok_rule, packing=d.packing,
                   assistant_only_loss=d.assistant_only_loss, student_chat_template=d.student_chat_template)
    if len(caches) > 1:  # several teachers: the caches are checked to cover the same windows first
        return build_multi_cache_data(caches, tokenizer, rows, eval_caches=as_list(d.eval_cache), **options)
    if d.cache:
        return build_cache_data(caches[0], tokenizer, rows, eval_cache=d.eval_cache, **options)
    return build_text_data(d.dataset, tokenizer, max_length=d.max_length, text_column=d.text_column,
                           max_samples=d.max_samples, packing=d.packing or "isolated")


def _build_model(cfg: Any, tokenizer: Any, student_config: Any, rows: int, data: Any) -> Any:
    """The KD settings (checked against the caches), the pooling layout, then the student's weights and the
    `DistillModel` around them."""
    from transformers import set_seed

    from distill.losses import KDConfig
    from distill.training.config import student_pool_layers
    from distill.training.modeling import (
        DistillModel,
        aux_settings,
        head_rows,
        kd_config_for_caches,
        resolve_pool_layers,
    )
    from distill.training.teachers import parse_teacher_weights

    loss = cfg.loss
    # The one KDConfig of the run: its flags (kd_kind, temperature, use_tail, loss_chunk_size, divergence
    # parameters) and the caches' target kind; the model hands it to the kernel unchanged.
    kd_config = kd_config_for_caches(KDConfig.from_args(loss), data.readers)
    teacher_readers = getattr(data, "teacher_readers", [data.readers])
    teacher_kd_configs = [kd_config_for_caches(KDConfig.from_args(loss), readers) for readers in teacher_readers]
    teacher_weights = parse_teacher_weights(cfg.data.teacher_weights, len(teacher_readers))
    aux = aux_settings(data.reader, loss)
    if aux is not None:  # before loading weights: a bad --pool_student_layers is a one-line error at once
        resolve_pool_layers(student_pool_layers(cfg.model.pool_student_layers), aux,
                            int(student_config.get_text_config().num_hidden_layers))
    student = load_student(cfg, tokenizer, student_config)
    if head_rows(student) != rows:
        raise ConfigError(f"--student: LM head has {head_rows(student)} rows but config.vocab_size is {rows}; fix "
                          "the model's config")
    set_seed(cfg.training.seed)  # projection heads: the same initial values on every rank and every run
    return DistillModel(student, kd_config, aux, student_pool_layers(cfg.model.pool_student_layers),
                        teacher_weights=teacher_weights, teacher_kd_configs=teacher_kd_configs)


def _install_callbacks(trainer: Any, cfg: Any, extra_callbacks: list[Any]) -> None:
    """fp16 on CPU, one-line logs, skipped steps, the resolved config, checkpoint markers and guards, early stopping."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from distill.training.callbacks import (
        DistillEarlyStoppingCallback,
        OneLinePrinterCallback,
        OneLineProgressCallback,
        ResolvedConfigCallback,
    )
    from distill.training.checkpoints import CheckpointCompleteCallback, guard_checkpoint_saves
    from distill.training.nonfinite import SkipStepCallback
    from distill.training.precision import enable_cpu_fp16

    enable_cpu_fp16(trainer)  # --fp16 on CPU: real fp16 autocast + loss scaling, as on a GPU
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    # A bar only on a terminal: redrawn through a pipe or a launcher (accelerate relays stderr on its own thread) it
    # lands inside the per-step lines of stdout; there the lines alone are the record.
    bar = not cfg.training.disable_tqdm and sys.stderr.isatty()
    trainer.add_callback(OneLineProgressCallback() if bar else OneLinePrinterCallback())
    trainer.add_callback(SkipStepCallback(trainer, trainer.nonfinite))  # non-finite losses, fp16 overflows
    trainer.add_callback(ResolvedConfigCallback(cfg))
    trainer.add_callback(CheckpointCompleteCallback())  # marks each checkpoint once fully written (resume skips others)
    guard_checkpoint_saves(trainer)  # a full disk mid-save: one line naming the folder, the partial folder removed
    run = cfg.run
    if run.early_stopping_patience > 0:
        trainer.add_callback(DistillEarlyStoppingCallback(run.early_stopping_patience, run.early_stopping_min_delta,
                                                          run.early_stopping_warmup_steps, run.early_stopping_metric))
    for callback in extra_callbacks:
        trainer.add_callback(callback)


def print_summary(trainer: Any, cfg: Any) -> None:
    """The run's closing lines on the console (after the per-step lines)."""
    import os

    from distill.training.callbacks import run_summary

    t = cfg.training
    report_to = t.report_to if isinstance(t.report_to, list) else [t.report_to]
    curves = None
    if "tensorboard" in report_to or "all" in report_to:
        curves = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(t, "logging_dir", None) or \
            str(Path(t.output_dir) / "runs")
    for line in run_summary(trainer.state.log_history, t.output_dir, curves):
        print(line, flush=True)


def finish_distributed() -> None:
    """End the run on every rank together: the others wait until rank 0 has written the export, then all tear down
    the process group. A rank that simply exits while rank 0 still works closes its gloo/NCCL connections under it,
    and rank 0 then aborts at shutdown (SIGABRT seen under torchrun on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: _main(argv))


def _main(argv: list[str]) -> int:
    from distill.training.config import parse_config, validate
    from distill.training.export import export_student

    if any(a in ("-h", "--help", "--help-all") for a in argv):
        from distill.training.help_text import format_help

        print(format_help(full="--help-all" in argv), end="")
        return 0
    from distill.training.checkpoints import resolve_resume
    from distill.training.distributed import enable_cpu_deepspeed
    from distill.training.preflight import check_deepspeed, check_output_dir, check_previous_run, verify_caches

    enable_cpu_deepspeed()  # before parse_config: the TrainingArguments create the distributed state
    cfg = parse_config(argv)
    validate(cfg)
    check_deepspeed(cfg)
    check_output_dir(cfg.training.output_dir)  # before hours of loading: an unwritable folder fails at once
    check_previous_run(cfg.training.output_dir, overwrite=cfg.run.overwrite_output_dir,
                       resume=cfg.training.resume_from_checkpoint)
    resume = resolve_resume(cfg.training.resume_from_checkpoint, cfg.training.output_dir)  # complete ones only
    verify_caches(cfg.data)  # --verify_cache: every shard's checksum and values, before loading anything
    built = build_trainer(cfg)  # its ResolvedConfigCallback writes OUTPUT/distill_config.yaml once training starts
    built.trainer.train(resume_from_checkpoint=resume)
    export_student(built.trainer, built.tokenizer, Path(cfg.training.output_dir))
    if built.trainer.is_world_process_zero():
        print_summary(built.trainer, cfg)
    finish_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
