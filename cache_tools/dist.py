"""Process-group plumbing for multi-GPU / multi-node builds. Ranks never exchange tensors: each builds its own shards
and the process group (gloo, CPU) only provides barriers. Launchers (`torchrun`, `accelerate launch`) set the env."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from cache_tools.format.errors import BuildError

# A barrier waits for the slowest rank's whole share of the build, which can take hours.
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as err:
        raise BuildError(f"environment variable {name}={value!r} is not an integer; fix the launcher") from err


def init_distributed() -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK; with more than one process, join a gloo group (barriers only)."""
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if info.world_size > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
    return info


def barrier(info: DistInfo) -> None:
    if info.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(info: DistInfo) -> None:
    if info.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def pick_device(requested: str | None, info: DistInfo) -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is there (or `requested`), else CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", info.local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")
