"""Multi-process DeepSpeed without CUDA (CPU, gloo): make accelerate count the ranks.

Under `accelerate launch` (DEEPSPEED config) or `torchrun ... --deepspeed FILE`, transformers builds accelerate's
`PartialState` with `cpu=False` and `ACCELERATE_USE_DEEPSPEED=true`. Accelerate picks the process-group backend from
the devices it finds (nccl for CUDA, hccl, xccl, ...); with no accelerator at all it finds none, initialises
DeepSpeed's process group anyway, but then records `backend=None`, `num_processes=1`, `process_index=0` on every
rank. DeepSpeed then refuses the batch sizes ("train_batch_size is not equal to micro_batch_per_gpu *
gradient_acc_step * world_size 2 != 2 * 1 * 2"), and the data loader would not be sharded across ranks either.

`enable_cpu_deepspeed()` closes exactly that gap: when (and only when) a launcher started several ranks for DeepSpeed
and no CUDA device exists, accelerate's backend choice becomes gloo / MULTI_CPU; accelerate then initialises
DeepSpeed's process group with `dist_backend="gloo"`, reads rank and world size from the launcher's environment,
and switches the state to DEEPSPEED as on GPUs. Every other case (GPUs, one process, `--use_cpu` DDP) is untouched.
"""

from __future__ import annotations

import os

_PATCHED = "_distill_cpu_deepspeed"


def _launched_deepspeed_ranks_without_cuda(cpu: bool) -> bool:
    """True when accelerate is about to set up DeepSpeed for a multi-rank launch on a machine without CUDA."""
    import torch

    return (not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            and not torch.cuda.is_available())


def enable_cpu_deepspeed() -> None:
    """Make accelerate's `PartialState` choose gloo for DeepSpeed ranks on CPU (idempotent; call before the
    TrainingArguments are built, since their `__post_init__` creates the distributed state)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, _PATCHED, False):
        return

    def _prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and distributed_type == DistributedType.NO and _launched_deepspeed_ranks_without_cuda(cpu):
            # MULTI_CPU makes accelerate read RANK/WORLD_SIZE and keep the real world size; it becomes DEEPSPEED
            # right after (PartialState.__init__ overrides the type once DeepSpeed's process group exists).
            return "gloo", DistributedType.MULTI_CPU
        return chosen, distributed_type

    setattr(_prepare_backend, _PATCHED, True)
    PartialState._prepare_backend = _prepare_backend
