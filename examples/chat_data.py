"""Conversations made from text the repository has (no download), in TRL's `messages` format, for tests, benches
and demos: `make_conversations(texts, count)`."""

from __future__ import annotations

import numpy as np


def make_conversations(texts: list[str], count: int, *, seed: int = 0, reasoning: bool = True,
                       max_turns: int = 3, context: tuple[int, int] = (30, 90)) -> list[dict]:
    """`count` rows of TRL's `messages` format: short user questions, longer assistant answers (answers are a
    minority of tokens in real chat data only when prompts are long, so prompts here carry a context passage),
    some with a system turn, some multi-turn, some with `<think>` reasoning or `reasoning_content`."""
    rng = np.random.default_rng(seed)
    words = " ".join(texts).split()

    def snippet(lo: int, hi: int) -> str:
        n = int(rng.integers(lo, hi))
        start = int(rng.integers(0, max(1, len(words) - n)))
        return " ".join(words[start : start + n])

    rows = []
    for i in range(count):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You answer briefly. " + snippet(3, 8)})
        for turn in range(int(rng.integers(1, max_turns + 1))):
            messages.append({"role": "user", "content": f"Context: {snippet(*context)}\nQuestion: {snippet(4, 12)}?"})
            answer = snippet(8, 40)
            if reasoning and (i + turn) % 4 == 1:
                answer = f"<think>\n{snippet(5, 20)}\n</think>\n\n{answer}"
            msg = {"role": "assistant", "content": answer}
            if reasoning and (i + turn) % 4 == 3:
                msg["reasoning_content"] = snippet(5, 15)
            messages.append(msg)
        rows.append({"messages": messages})
    return rows
