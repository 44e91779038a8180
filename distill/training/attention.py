"""Block-diagonal causal attention for windows that pack several documents (isolated packing).

Why we build the 4-D mask ourselves: the installed transformers (5.x `masking_utils`) detects packed documents from
`position_ids` only when no 2-D attention mask is given; a padded batch always has one, and then every token
attends to every earlier token of its row, across documents. A ready 4-D mask is passed through unchanged by every
attention implementation that takes a mask (eager adds it to the scores, SDPA hands it to the kernel), so one
additive mask serves both, on CPU and on GPUs without FlashAttention.

fp16 safety: blocked entries hold the most negative finite value of the compute dtype (not -inf), and every query
row keeps at least its own key (a padding row attends to itself only), so no row is fully masked and softmax never
produces NaN, in fp32, fp16 or under autocast (which may round the value to -inf: still one finite entry per row).
"""

from __future__ import annotations

import torch


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] segment ids (-1 = padding) -> additive mask [B, 1, L, L] of `dtype`: 0 where query i may attend to
    key j (same segment, j <= i, j not padding, or j == i), the dtype's minimum elsewhere."""
    B, L = segment_ids.shape
    device = segment_ids.device
    index = torch.arange(L, device=device)
    causal = index[:, None] >= index[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real_key = (segment_ids >= 0)[:, None, :]
    allowed = (same & real_key & causal) | (index[:, None] == index[None, :])
    mask = torch.zeros((B, 1, L, L), dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def packed_inputs(attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
                  segment_ids: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask, position_ids) to hand the base model: the 2-D padding mask unchanged when no row packs two pieces,
    else the block-diagonal 4-D mask with per-document positions."""
    if segment_ids is None or position_ids is None or int(segment_ids.max()) <= 0:
        return attention_mask, None  # one piece per row: the usual causal mask and positions, bit for bit
    return block_causal_mask(segment_ids, dtype), position_ids
