"""Export after training: OUTPUT/student (save_pretrained + tokenizer, loadable with AutoModelForCausalLM) and the
projection heads beside it (OUTPUT/projection_heads.safetensors + .json), never inside the student folder.

Each artefact is written to a temp path and renamed into place, so an interrupted export leaves no half folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cache_tools.format.fsutil import atomic_path, atomic_write_text
from distill.training.components import COMPONENTS

STUDENT_DIR = "student"
HEADS_FILE = "projection_heads.safetensors"
HEADS_META = "projection_heads.json"


def export_student(trainer: Any, tokenizer: Any, output_dir: Path) -> Path:
    """Gather the full state dict (all ranks must call: under ZeRO-3 it is a collective), write on rank 0."""
    from safetensors.torch import save_file

    wrapped = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(wrapped)
    target = output_dir / STUDENT_DIR
    if not trainer.args.should_save or int(os.environ.get("RANK", "0")) != 0:
        return target
    model = trainer.accelerator.unwrap_model(trainer.model)
    student_state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    with atomic_path(target) as tmp:
        model.student.save_pretrained(tmp, state_dict=student_state)
        tokenizer.save_pretrained(tmp)
    heads = {k[len("projection."):]: v.detach().contiguous().cpu() for k, v in state.items()
             if k.startswith("projection.")}
    if heads:
        with atomic_path(output_dir / HEADS_FILE) as tmp_heads:
            save_file(heads, str(tmp_heads), metadata={"format": "pt"})
        meta = {"components": [c.name for c in COMPONENTS if c.exported],  # the losses these heads were trained for
                "student_pool_layers": model.student_pool_layers,
                "teacher_pool_layers": model.aux.teacher_pool_layers, "teacher_hidden": model.aux.teacher_hidden}
        atomic_write_text(output_dir / HEADS_META, json.dumps(meta, indent=2) + "\n")
    return target
