"""Entry point: `python -m distill.train CONFIG.yaml [--key value ...]` (or under `accelerate launch` / `torchrun`).

Distillation: `--student S --cache DIR --output_dir OUT`. LM-only (no cache, CE only, e.g. to pretrain a small
teacher): `--student_config config.json --tokenizer DIR --dataset file.txt --kd_weight 0 --output_dir OUT`.
Bad input -> one line on stderr naming the file/flag and the fix, exit code 2; nothing half-written.

`build_trainer(cfg)` assembles the same pieces for benchmarks and tests.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


@dataclass
class Built:
    trainer: Any  # DistillTrainer
    tokenizer: Any
    model: Any  # DistillModel
    data: Any  # distill.data.BuiltData


def is_main_process() -> bool:
    """Rank 0 of the job. Read from the environment: under some launchers the Accelerator reports one process per
    rank before DeepSpeed's process group exists, while RANK is always set by the launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def load_tokenizer(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.student
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        from distill.training.config import ConfigError

        raise ConfigError(f"--tokenizer {source}: cannot load a tokenizer ({type(err).__name__}); pass a tokenizer "
                          "directory or hub id") from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of every loss; any id will do
    return tok


def load_student_config(cfg: Any) -> Any:
    """The student's config alone (cheap): lets us check the cache against the student before loading weights."""
    from transformers import AutoConfig

    from distill.training.config import ConfigError

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

    from distill.training.config import ConfigError
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
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from distill.data.dataset import DistillCollator, build_cache_data, build_text_data
    from distill.losses import KDConfig
    from distill.training.callbacks import (
        DistillEarlyStoppingCallback,
        OneLinePrinterCallback,
        OneLineProgressCallback,
        SkipNonFiniteCallback,
    )
    from distill.training.checkpoints import CheckpointCompleteCallback
    from distill.training.config import student_pool_layers
    from distill.training.modeling import AuxSettings, DistillModel, head_rows
    from distill.training.trainer import DistillTrainer

    tokenizer = load_tokenizer(cfg)
    student_config = load_student_config(cfg)
    # Check the data against the student's vocabulary BEFORE loading (possibly billions of) weights.
    rows = int(student_config.get_text_config().vocab_size)
    d = cfg.data
    if d.cache:
        data = build_cache_data(d.cache, tokenizer, rows, eval_cache=d.eval_cache, eval_fraction=d.eval_fraction,
                                max_eval_sequences=d.max_eval_sequences, target_builder=target_builder,
                                xtok_rule=d.xtok_rule)
    else:
        data = build_text_data(d.dataset, tokenizer, max_length=d.max_length, text_column=d.text_column,
                               max_samples=d.max_samples)
    student = load_student(cfg, tokenizer, student_config)
    if head_rows(student) != rows:
        from distill.training.config import ConfigError

        raise ConfigError(f"--student: LM head has {head_rows(student)} rows but config.vocab_size is {rows}; fix "
                          "the model's config")
    loss = cfg.loss
    aux = None
    if data.reader is not None and (loss.feature_weight > 0 or loss.contrastive_weight > 0):
        m = data.reader.manifest
        aux = AuxSettings(teacher_hidden=m.pooling.hidden_size, teacher_pool_layers=list(m.pooling.layers),
                          teacher_num_layers=m.teacher.num_hidden_layers,
                          contrastive_temperature=loss.contrastive_temperature)
    kd_config = KDConfig.from_args(loss)  # kd_kind, temperature, use_tail, loss_chunk_size, divergence parameters
    set_seed(cfg.training.seed)  # projection heads: the same initial values on every rank and every run
    model = DistillModel(student, kd_config, aux, student_pool_layers(cfg.model.pool_student_layers))
    trainer = DistillTrainer(
        model=model, args=cfg.training, data_collator=DistillCollator(tokenizer.pad_token_id),
        train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer, loss_args=loss,
    )
    from distill.training.precision import install_fp16

    install_fp16(trainer)  # --fp16 on CPU: real fp16 autocast + loss scaling, as on a GPU; skipped-step bookkeeping
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(OneLinePrinterCallback() if cfg.training.disable_tqdm else OneLineProgressCallback())
    trainer.add_callback(SkipNonFiniteCallback(trainer))
    trainer.add_callback(CheckpointCompleteCallback())  # marks each checkpoint once fully written (resume skips others)
    run = cfg.run
    if run.early_stopping_patience > 0:
        trainer.add_callback(DistillEarlyStoppingCallback(run.early_stopping_patience, run.early_stopping_min_delta,
                                                          run.early_stopping_warmup_steps, run.early_stopping_metric))
    for callback in extra_callbacks or []:
        trainer.add_callback(callback)
    return Built(trainer, tokenizer, model, data)


def finish_distributed() -> None:
    """End the run on every rank together: the others wait until rank 0 has written the export, then all tear down
    the process group. A rank that simply exits while rank 0 still works closes its gloo/NCCL connections under it,
    and rank 0 then aborts at shutdown (SIGABRT seen under torchrun on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (an error re-raised from a DataLoader worker carries a traceback: keep its
    last line, which is the original message)."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) > 1 and "Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(ln.strip() for ln in lines)


def main(argv: list[str] | None = None) -> int:
    from cache_tools.schema import CacheError
    from distill.data.xtok.token_bytes import TokenizerError
    from distill.training.checkpoints import resolve_resume
    from distill.training.config import ConfigError, parse_config, validate, write_resolved_config
    from distill.training.export import export_student
    from distill.training.preflight import verify_caches
    from distill.training.trainer import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from transformers import HfArgumentParser

        from distill.training.config import ARG_CLASSES

        HfArgumentParser(ARG_CLASSES).print_help()
        return 0
    try:
        from distill.training.distributed import enable_cpu_deepspeed

        enable_cpu_deepspeed()  # before parse_config: the TrainingArguments create the distributed state
        cfg = parse_config(argv)
        validate(cfg)
        resume = resolve_resume(cfg.training.resume_from_checkpoint, cfg.training.output_dir)  # complete ones only
        verify_caches(cfg.data)  # --verify_cache: every shard's checksum and values, before loading anything
        built = build_trainer(cfg)
        if is_main_process():
            write_resolved_config(cfg, cfg.training.output_dir)
        built.trainer.train(resume_from_checkpoint=resume)
        export_student(built.trainer, built.tokenizer, Path(cfg.training.output_dir))
        finish_distributed()
    except (ConfigError, CacheError, NonFiniteLossError, TokenizerError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
