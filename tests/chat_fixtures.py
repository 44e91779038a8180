"""Conversations for tests and benches, made from text the repository has (no download), and helpers for tiny dense
Qwen3 teachers that use the real Qwen3 tokenizer (../shared/tokenizers/qwen3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from examples.chat_data import make_conversations  # noqa: F401 - re-exported for the tests

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN3 = SHARED / "tokenizers" / "qwen3"
SMOLLM2 = SHARED / "tokenizers" / "smollm2"
QWEN3_HEAD_ROWS = 151936


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_qwen3_config(vocab_rows: int = QWEN3_HEAD_ROWS, *, hidden_size: int = 32, layers: int = 2):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_rows, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden_size // 4, max_position_embeddings=1024, tie_word_embeddings=False)


def chatml_assistant_mask(text: str, offsets: np.ndarray, end: str = "<|im_end|>") -> np.ndarray:
    """Independent computation for ChatML templates (Qwen3, SmolLM2): tokens inside an assistant turn's body (after
    '<|im_start|>assistant\\n', up to the end-of-turn token `end`) plus that token."""
    regions = [(m.start(1), m.end(1) + len(end))
               for m in re.finditer(r"<\|im_start\|>assistant\n(.*?)" + re.escape(end), text, flags=re.S)]
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for lo, hi in regions:
        mask |= (starts >= lo) & (ends <= hi) & (ends > starts)
    return mask
