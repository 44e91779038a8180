"""Checks run before any weights are loaded: `--verify_cache` (checksums and values of every shard), a writable
`--output_dir`, and what DeepSpeed would otherwise refuse with a traceback inside its engine set-up.

Training itself only validates the sequences it loads (cheap vectorised checks); corruption that keeps a shard's
size and passes those checks (a flipped bit in a log-prob) would train silently. `--verify_cache` reads every shard
once up front, as `cache_tools verify` does, and refuses to start on the first fault.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from cache_tools.format.errors import CacheError, ConfigError


def verify_caches(data: Any) -> None:
    """With `--verify_cache`: verify `data.cache` and `data.eval_cache`; raise CacheError (a one-line UserError,
    exit 2) naming the flag, the cache and its first fault. Every rank checks (no process group is needed)."""
    if not data.verify_cache:
        return
    from cache_tools.format.verify import verify_cache
    from distill.training.arguments import as_list

    for flag, cache in [*(("--cache", c) for c in as_list(data.cache)),
                        *(("--eval_cache", c) for c in as_list(data.eval_cache))]:
        faults = verify_cache(cache)
        if faults:
            more = f" (and {len(faults) - 1} more fault(s))" if len(faults) > 1 else ""
            raise CacheError(f"--verify_cache: {flag} {cache}: {faults[0]}{more}")


def check_output_dir(output_dir: str | Path) -> None:
    """Refuse (ConfigError) an --output_dir that cannot be written: a file, under a file, read-only, no permission.
    Probes by creating and removing a temp folder in the nearest existing ancestor, so nothing is left behind
    (`os.access` is not enough: root passes it on read-only file systems and sysfs)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {path}: is a file, not a folder; choose another --output_dir")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--output_dir {path}: {ancestor} is a file, not a folder; choose another --output_dir")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=ancestor))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"--output_dir {path}: cannot write in {ancestor} ({reason}); choose a writable folder or "
                          "fix its permissions") from err


# Set by every multi-process launcher (torchrun, deepspeed, accelerate with num_processes > 1; MPI for mpirun).
_LAUNCHER_VARS = ("RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def check_previous_run(output_dir: str | Path, *, overwrite: bool, resume: Any) -> None:
    """Refuse (ConfigError) to train into a folder that holds another run (its exported student, its resolved config
    or its checkpoints) unless --overwrite_output_dir or --resume_from_checkpoint says that is meant: a finished
    run's student is hours of work, and a rerun would replace it silently."""
    from distill.training.config import RESOLVED_CONFIG_NAME
    from distill.training.export import STUDENT_DIR

    path = Path(output_dir)
    if overwrite or resume or not path.is_dir():
        return
    found = [name for name in (STUDENT_DIR, RESOLVED_CONFIG_NAME) if (path / name).exists()]
    found += sorted(p.name for p in path.glob("checkpoint-*"))[:2]
    if found:
        raise ConfigError(f"--output_dir {path}: holds a previous run ({', '.join(found)}); pass "
                          "--overwrite_output_dir true to replace it, --resume_from_checkpoint true to continue it, or "
                          "choose another --output_dir")


def check_student_context(student_config: Any, flag: str, readers: list[Any], lm_max_length: int | None) -> None:
    """Refuse (ConfigError) windows longer than the student's positions (max_position_embeddings): past them a
    rotary model extrapolates and a learned-position model indexes out of range; either way it trains on garbage."""
    positions = getattr(student_config.get_text_config(), "max_position_embeddings", None)
    if not positions:
        return
    for reader in readers:
        length = int(reader.manifest.max_length)
        if length > positions:
            raise ConfigError(f"{flag}: {positions} positions (max_position_embeddings) but the cache "
                              f"{reader.cache_dir} holds windows of up to {length} tokens; rebuild the cache with "
                              f"`build-cache ... --max-length {positions}` or use a student with at least {length} "
                              "positions")
    if lm_max_length is not None and lm_max_length > positions:
        raise ConfigError(f"--max_length {lm_max_length}: the student ({flag}) has {positions} positions "
                          f"(max_position_embeddings); pass --max_length {positions} or less")


def check_deepspeed(cfg: Any) -> None:
    """Refuse, before anything is written, what would otherwise fail inside DeepSpeed's engine set-up with its
    traceback (--fp16 on an accelerator without fp16 support), and give a single process its world of one.

    DeepSpeed needs a process group even for one process. Multi-process launchers define it; one process (plain
    `python -m distill.train`, or `accelerate launch` with one process and no DeepSpeed config, as in
    launch/accelerate/p100_fp16_single_gpu.yaml) defines nothing, and DeepSpeed would fall back to MPI discovery.
    There the world of one is set up as the transformers documentation does for notebooks (RANK=0, WORLD_SIZE=1,
    a free local port), so `--deepspeed` means the same under every launcher."""
    t = cfg.training
    if not t.deepspeed:
        return
    from deepspeed.accelerator import get_accelerator

    if not any(var in os.environ for var in _LAUNCHER_VARS):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    accel = get_accelerator()
    if t.fp16 and not accel.is_fp16_supported():
        raise ConfigError(f"--fp16 with --deepspeed {t.deepspeed}: DeepSpeed's {accel.device_name()} accelerator has "
                          "no fp16 support on this machine; drop --fp16 (fp32), use --bf16, or run on a GPU")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
