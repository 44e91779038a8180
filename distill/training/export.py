"""Export after training: OUTPUT/student (save_pretrained + tokenizer, loadable with AutoModelForCausalLM) and the
projection heads beside it (OUTPUT/projection_heads.safetensors + .json), never inside the student folder.

Each artefact is written to a temp path and renamed into place, so an interrupted export leaves no half folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STUDENT_DIR = "student"
HEADS_FILE = "projection_heads.safetensors"
HEADS_META = "projection_heads.json"


def export_student(trainer: Any, tokenizer: Any, output_dir: Path) -> Path:
    """Gather the full state dict (all ranks must call: under ZeRO-3 it is a collective), write on rank 0."""
    from safetensors.torch import save_file

    from cache_tools.schema import atomic_write_text

    wrapped = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(wrapped)
    target = output_dir / STUDENT_DIR
    if not trainer.args.should_save or int(os.environ.get("RANK", "0")) != 0:
        return target
    model = trainer.accelerator.unwrap_model(trainer.model)
    student_state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    tmp = output_dir / f".{STUDENT_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.student.save_pretrained(tmp, state_dict=student_state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    heads = {k[len("projection."):]: v.detach().contiguous().cpu() for k, v in state.items()
             if k.startswith("projection.")}
    if heads:
        tmp_heads = output_dir / f".{HEADS_FILE}.{os.getpid()}.tmp"
        save_file(heads, str(tmp_heads), metadata={"format": "pt"})
        os.replace(tmp_heads, output_dir / HEADS_FILE)
        meta = {"student_pool_layers": model.student_pool_layers,
                "teacher_pool_layers": model.aux.teacher_pool_layers, "teacher_hidden": model.aux.teacher_hidden}
        atomic_write_text(output_dir / HEADS_META, json.dumps(meta, indent=2) + "\n")
    return target
