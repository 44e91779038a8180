"""fp16 on CPU: the P100 recipe's precision path (fp16 autocast + dynamic loss scaling), runnable without a GPU.

accelerate enables native fp16 AMP only on accelerator devices: with `--fp16 true --use_cpu true` it sets neither
autocast nor a GradScaler, so the run silently trains in fp32 (loss_scale stays 1.0) and nothing of the fp16 path
(scaled backward, overflow skip, scale back-off, evaluation outside autocast) is exercised. torch supports both on
CPU (`torch.autocast("cpu", dtype=torch.float16)`, `torch.amp.GradScaler("cpu")`), so we switch them on exactly as
accelerate does on a GPU: the model's forward is wrapped in fp16 autocast when the trainer prepares it, backward
scales the loss, gradient clipping unscales first, and the optimizer wrapper skips a step whose gradients overflowed
and halves the scale.

Skipping the steps whose gradients overflowed (and not advancing the LR schedule on them):
`distill.training.nonfinite`.
"""

from __future__ import annotations

from typing import Any


def enable_cpu_fp16(trainer: Any) -> bool:
    """Give `trainer.accelerator` CPU fp16 autocast + a dynamic GradScaler when `--fp16` runs on CPU without
    DeepSpeed (DeepSpeed has its own loss scaler). Call after the Trainer is built and before `train()` (the model
    and optimizer are wrapped at the start of training). Returns whether it changed anything."""
    import torch
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if not (trainer.args.fp16 and accelerator.device.type == "cpu" and accelerator.scaler is None
            and accelerator.distributed_type != DistributedType.DEEPSPEED):
        return False
    accelerator.native_amp = True  # read by prepare_model (autocast), backward and clip_grad_norm_ (unscale)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # torch's defaults: scale 2**16, x0.5 on overflow
    return True
