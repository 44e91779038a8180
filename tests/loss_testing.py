"""Helpers for the loss tests (not a test module)."""

from __future__ import annotations

from typing import Any

import torch


def loss_and_grads(fn: Any, hidden: torch.Tensor, weight: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Call a fused loss on fresh leaf copies of `hidden` and `weight`, backpropagate its `.loss`, and return
    (its output, d loss / d hidden, d loss / d weight)."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    out = fn(hidden, weight, *args, **kwargs)
    out.loss.backward()
    return out, hidden.grad, weight.grad
