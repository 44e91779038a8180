"""The demo's trained teacher, kept between runs: training it is the demo's longest stage, and with the same inputs
(text, tokenizer, model config, settings, pinned CPU environment, library and project code) it comes out the same.
The key hashes all of those; a run with any of them changed trains (and keeps) its own teacher.

Kept under $DISTILL_DEMO_CACHE (default ~/.cache/distill-demo/teachers/<key>/): the exported model and the
teacher's TensorBoard run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("distill", "cache_tools/format")  # the trainer and what it reads: any change there retrains
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def cache_root() -> Path:
    if os.environ.get("DISTILL_DEMO_CACHE"):
        return Path(os.environ["DISTILL_DEMO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill-demo" / "teachers"


def teacher_key(files: list[Path], settings: dict[str, Any]) -> str:
    """Hash of every input that determines the trained teacher: `files` (text, tokenizer, config), `settings`, the
    CPU environment, torch/transformers versions and the project's training code."""
    import torch
    import transformers

    h = hashlib.sha256()
    for path in files:
        for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            h.update(file.name.encode() + b"\0" + file.read_bytes())
    meta = {"settings": settings, "env": {k: os.environ.get(k) for k in ENV_KEYS},
            "torch": torch.__version__, "transformers": transformers.__version__}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for folder in CODE_DIRS:
        for file in sorted((REPO_ROOT / folder).rglob("*.py")):
            h.update(str(file.relative_to(REPO_ROOT)).encode() + b"\0" + file.read_bytes())
    return h.hexdigest()[:24]


def restore(key: str, model_dir: Path, run_dir: Path) -> bool:
    """Copy a kept teacher (model + TensorBoard run) into place; False when none is kept under `key`."""
    kept = cache_root() / key
    if not (kept / "model" / "config.json").is_file():
        return False
    shutil.copytree(kept / "model", model_dir, dirs_exist_ok=True)
    if (kept / "run").is_dir():
        shutil.copytree(kept / "run", run_dir, dirs_exist_ok=True)
    return True


def keep(key: str, model_dir: Path, run_dir: Path) -> Path | None:
    """Keep a freshly trained teacher under `key` (written to a temp folder, then renamed: never half a teacher);
    None when the cache folder cannot be written (the demo goes on without it)."""
    target = cache_root() / key
    temp = target.with_name(target.name + ".tmp")
    try:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.copytree(model_dir, temp / "model")
        if run_dir.is_dir():
            shutil.copytree(run_dir, temp / "run")
        if target.exists():
            shutil.rmtree(temp)
        else:
            temp.rename(target)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        return None
    return target
