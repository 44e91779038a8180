"""Checkpoints that were not fully written: detect them and resume from the last complete one.

`transformers.Trainer` writes a checkpoint in place, file by file (weights, optimizer, scheduler, scaler, RNG
states, trainer_state.json last; under DeepSpeed every rank writes its own shards). A run killed mid-save leaves a
`checkpoint-N` folder that `--resume_from_checkpoint` picks (it is the newest) and then crashes on, although the
previous checkpoint would have resumed exactly.

`CheckpointCompleteCallback` closes every save with a marker, `checkpoint_complete.json`, listing each file of the
folder and its size; it is written (atomically) by rank 0 only after all ranks have finished writing. A folder is
complete when its marker exists and every listed file has its recorded size. A folder without a marker (written
before markers existed) is judged by its structure instead: a readable trainer_state.json, model weights and, unless
DeepSpeed saved the optimizer in its own folder, an optimizer state, each not truncated (safetensors header and
length, zip directory of torch files).

`guard_checkpoint_saves(trainer)` turns a save that fails on a full disk into one line naming the folder and the
fix, after removing the partial folder (no marker: resume would pass over it anyway; removing it frees space).

`resolve_resume(value, output_dir)` turns `--resume_from_checkpoint` (true / a path / unset) into the folder to
resume from, skipping incomplete ones with one warning line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cache_tools.format.errors import CheckpointSaveError, ConfigError, disk_full_reason

MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0", "")


class CheckpointCompleteCallback(TrainerCallback):
    """Writes MARKER into each checkpoint once every rank has finished saving it (Trainer calls `on_save` right
    after `_save_checkpoint` on every rank)."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # other ranks' shards (DeepSpeed, RNG states) are written when all arrive here
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_marker(folder)


def guard_checkpoint_saves(trainer: Any) -> None:
    """Wrap `trainer._save_checkpoint` (the one place every periodic save goes through) so that a full disk ends the
    run with a `CheckpointSaveError` instead of a library traceback. Other errors pass through unchanged."""
    save = trainer._save_checkpoint

    def guarded(model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
        folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        try:
            return save(model, trial, *args, **kwargs)
        except Exception as err:
            reason = disk_full_reason(err)
            if reason is None:
                raise
            removed = folder.is_dir() and not (folder / MARKER).exists()
            if removed:
                shutil.rmtree(folder, ignore_errors=True)
            raise CheckpointSaveError(
                f"{folder}: saving the checkpoint failed ({reason}: the disk is full or a size limit was reached)"
                f"{'; the partial folder was removed' if removed else ''}; free disk space, then rerun with "
                "--resume_from_checkpoint true (it resumes from the last complete checkpoint)") from err

    trainer._save_checkpoint = guarded


def write_marker(folder: Path) -> None:
    """Record every file of `folder` (relative path -> size in bytes), atomically."""
    from cache_tools.format.fsutil import atomic_write_text

    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MARKER}
    atomic_write_text(folder / MARKER, json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_fault(folder: Path) -> str | None:
    """None when `folder` holds a completely written checkpoint, else what is missing or damaged (short phrase)."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MARKER} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} of {size} bytes"
        return None
    return _structural_fault(folder)


def _structural_fault(folder: Path) -> str | None:
    """For checkpoints without a marker: the files a resume reads must exist and not be truncated."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    weights = [folder / name for name in _WEIGHTS if (folder / name).is_file()]
    if not weights:
        return "the model weights are missing"
    deepspeed = any(p.is_dir() for p in folder.glob("global_step*"))
    optimizer = folder / "optimizer.pt"
    if not deepspeed and not optimizer.is_file():
        return "optimizer.pt is missing"
    for path in [*weights, *([optimizer] if optimizer.is_file() else [])]:
        fault = _file_fault(path)
        if fault:
            return f"{path.name} {fault}"
    return None


def _file_fault(path: Path) -> str | None:
    """Cheap truncation checks: a safetensors file holds its header and every tensor it declares; a torch file's
    zip directory (at the end of the file) is readable."""
    if path.suffix == ".safetensors":
        try:
            with path.open("rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error):
            return "has a damaged header"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return None if path.stat().st_size >= 8 + header_len + end else "is truncated"
    if path.suffix in (".pt", ".bin"):
        return None if zipfile.is_zipfile(path) else "is truncated or damaged"
    return None


def _step(folder: Path) -> int:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else -1


def checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=_step, reverse=True)


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume_from_checkpoint` -> the checkpoint folder to resume from (None: start from scratch).

    true: the newest complete checkpoint in `output_dir`; a path: that checkpoint if complete, else the newest
    complete one before it in the same folder. Passing over incomplete checkpoints prints one warning line (rank 0);
    no complete one at all is a ConfigError."""
    text = str(value).strip().lower() if value is not None else ""
    if value is None or value is False or text in _FALSE:
        return None
    if value is True or text in _TRUE:
        root, newest_step, flag = Path(output_dir), None, "--resume_from_checkpoint true"
    else:
        requested = Path(str(value))
        if not requested.is_dir():
            raise ConfigError(f"--resume_from_checkpoint {value}: no such checkpoint folder; pass a checkpoint-N "
                              "folder or `true` for the newest one in --output_dir")
        if checkpoint_fault(requested) is None:
            return str(requested)
        root, newest_step, flag = requested.parent, _step(requested), f"--resume_from_checkpoint {value}"
    candidates = [p for p in checkpoints(root) if newest_step is None or _step(p) < newest_step]
    if not candidates and newest_step is None:
        raise ConfigError(f"{flag}: no checkpoint-N folder in {root}; drop the flag to start from scratch")
    skipped = [] if newest_step is None else [f"{requested.name}: {checkpoint_fault(requested)}"]
    for folder in candidates:
        fault = checkpoint_fault(folder)
        if fault is None:
            if skipped and int(os.environ.get("RANK", "0")) == 0:
                print(f"warning: skipping checkpoint(s) not fully written ({'; '.join(skipped)}); resuming from "
                      f"{folder}", file=sys.stderr, flush=True)
            return str(folder)
        skipped.append(f"{folder.name}: {fault}")
    raise ConfigError(f"{flag}: no completely written checkpoint in {root} ({'; '.join(skipped)}); drop the flag "
                      "to start from scratch")
