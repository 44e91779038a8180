"""Loader throughput of a conversational cache against a plain-text cache, measured in the same run: the training
DataLoader (2 workers, the trainer's `CacheDataset` + `DirectTargets` + `DistillCollator`) on a cache built from
conversations (ChatML template, isolated packing, targets stored on assistant positions only: the student reads the
masks, expands the stored targets, and the collator builds per-document positions) and on a cache built from the
same documents as plain text. Goal: conversational >= 0.8x plain tokens/s.

    python -m bench.bench_chat_loader [--quick]
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from bench.common import WORK_ROOT, apply_offline_env, build_cache, ratio, tiny_assets

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPES = {True: {"max_length": 256, "top_k": 32, "samples": 120, "batch": 8, "epochs": 2},
          False: {"max_length": 512, "top_k": 256, "samples": 300, "batch": 8, "epochs": 3}}


def conversations(text_file: Any, limit: int) -> list[dict[str, Any]]:
    """One conversation per document: the user gives its first third and asks to continue, the assistant answers
    with the rest (a prompt/answer mix where most tokens are the answer)."""
    rows = []
    for line in text_file.read_text(encoding="utf-8").splitlines()[:limit]:
        cut = len(line) // 3
        if cut < 10:
            continue
        rows.append({"messages": [{"role": "user", "content": "Continue: " + line[:cut]},
                                  {"role": "assistant", "content": line[cut:]}]})
    return rows


def measure(cache: Any, shape: dict[str, Any], pad_id: int, chat: bool) -> float:
    from bench.bench_loader import loader_tokens_per_s
    from cache_tools.format.reader import TeacherCacheReader
    from distill.data.dataset import CacheDataset, DirectTargets
    from distill.data.validation import SequenceValidator

    reader = TeacherCacheReader(cache, check_finite=False)
    builder = DirectTargets(SequenceValidator(reader), isolated=chat, assistant_only=chat)
    return loader_tokens_per_s(CacheDataset(reader, np.arange(len(reader)), builder), shape["batch"],
                               shape["epochs"], pad_id)[0]


def run(quick: bool, device: str = "cpu") -> dict[str, Any]:
    from transformers import AutoTokenizer

    apply_offline_env()
    shape = SHAPES[quick]
    assets = tiny_assets(WORK_ROOT / "assets")
    root = WORK_ROOT / ("chat_loader_quick" if quick else "chat_loader")
    root.mkdir(parents=True, exist_ok=True)
    template = root / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    convs = root / "conversations.jsonl"
    convs.write_text("".join(json.dumps(r) + "\n" for r in conversations(assets["text"], shape["samples"])),
                     encoding="utf-8")
    plain, chat = root / "plain", root / "chat"
    common = {"top_k": shape["top_k"], "max_length": shape["max_length"], "max_samples": shape["samples"]}
    build_s = {"plain": build_cache(assets["teacher"], assets["text"], plain, **common),
               "chat": build_cache(assets["teacher"], convs, chat, **common, extra=["--chat-template", str(template)])}
    pad_id = AutoTokenizer.from_pretrained(assets["tokenizer"]).eos_token_id
    first = measure(plain, shape, pad_id, chat=False)
    chat_tps = measure(chat, shape, pad_id, chat=True)
    last = measure(plain, shape, pad_id, chat=False)
    baseline = (first + last) / 2
    return {
        "shape": shape,
        "tokens_per_s": {"plain (first)": first, "conversational": chat_tps, "plain (last)": last},
        "build_s": build_s,
        "ratios": {"conversational loader vs plain": ratio(chat_tps, baseline, ">= 0.8", "plain loader (mean of "
                                                          "first and last)")},
        "notes": ["same teacher and documents; conversational = ChatML, isolated packing, assistant-only targets; "
                  "direct path, 2 workers, validating builder; plain measured before and after (drift check)"],
    }


if __name__ == "__main__":
    from bench.common import run_standalone

    raise SystemExit(run_standalone(run, __doc__.split("\n\n")[0]))
