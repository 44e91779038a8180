"""Conversational caches: bytes per token with teacher targets stored only where the next token is assistant content
(the default) vs at every position (`--all-positions`), and build throughput of a conversational cache vs a plain-text
cache of the same rendered text, all in one run.

Data: `examples.chat_data.make_conversations` over held-out tinyshakespeare: prompts carry a context passage
(30-90 words) and a question, answers are 8-40 words, some multi-turn, some with reasoning, rendered with the real
Qwen3 chat template (the assistant share of tokens is reported). Teacher: `bench.storage_teacher` (151,936 head rows,
realistic distributions). `--quick`: a tiny random teacher and a ChatML template file (paths only). Run alone:
`python -m bench.bench_chat [--quick]`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import WORK_ROOT, ratio, run_standalone, tiny_assets

MAX_LENGTH = 512
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VARIANTS = {  # name -> extra build-cache flags; each built assistant-only and with --all-positions
    "topk fp16 k=256": ["--top-k", "256", "--encoding", "fp16"],
    "topk compact k=256": ["--top-k", "256", "--encoding", "compact"],
    "sampled compact N=64": ["--targets", "sampled", "--samples", "64", "--encoding", "compact"],
}
QUICK_VARIANTS = {"topk fp16 k=32": ["--top-k", "32"], "topk compact k=32": ["--top-k", "32", "--encoding", "compact"]}


def _build(teacher: Path, data: Path, out: Path, flags: list[str]) -> float:
    from cache_tools.cli import main

    start = time.perf_counter()
    code = main(["build-cache", "--teacher", str(teacher), "--dataset", str(data), "--output", str(out),
                 "--max-length", str(MAX_LENGTH), "--dtype", "fp32", "--batch-size", "4", "--overwrite",
                 "--no-progress", *flags])
    if code != 0:
        raise RuntimeError(f"cache_tools build-cache exited with {code} for {out}")
    return time.perf_counter() - start


def _data(root: Path, texts: list[str], count: int, template: str | None, tokenizer: Any) -> tuple[Path, Path]:
    """(conversations.jsonl, plain.txt): the same conversations, and their rendered text one document per line."""
    from cache_tools.format import conversations
    from examples.chat_data import make_conversations

    rows = make_conversations(texts, count, seed=0)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rendered = [conversations.render(tokenizer, conversations.check_messages(r["messages"]), template=template).text
                for r in rows]
    plain = root / "plain.txt"
    plain.write_text("".join(t.replace("\n", " ") + "\n" for t in rendered), encoding="utf-8")
    return chat, plain


def run(quick: bool, device: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench import storage_teacher
    from cache_tools.inspect_cache import cache_summary

    root = WORK_ROOT / "chat"
    root.mkdir(parents=True, exist_ok=True)
    if quick:
        assets = tiny_assets(WORK_ROOT / "assets")
        teacher, variants, count = assets["teacher"], QUICK_VARIANTS, 12
        template_file = root / "chatml.jinja"
        template_file.write_text(CHATML, encoding="utf-8")
        texts = assets["text"].read_text(encoding="utf-8").splitlines()
        template_flags, template = ["--chat-template", str(template_file)], CHATML
    elif not storage_teacher.available():
        return {"status": "skipped", "reason": f"needs {storage_teacher.QWEN_TOKENIZER} (../shared)"}
    else:
        built = storage_teacher.build_teacher(WORK_ROOT / "storage-teacher", tokens=32 * MAX_LENGTH)
        teacher, variants, count = built["teacher"], VARIANTS, 16
        texts = Path(built["text"]).read_text(encoding="utf-8").split(". ")
        template_flags, template = [], None
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    chat, plain = _data(root, texts, count, template, tokenizer)
    sizes: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for index, (name, flags) in enumerate(variants.items()):
        for suffix, extra in (("assistant-only", []), ("all positions", ["--all-positions"])):
            out = root / f"v{index}-{len(extra)}"
            seconds[f"{name} {suffix}"] = _build(teacher, chat, out, [*flags, *template_flags, *extra])
            s = cache_summary(out)
            sizes[f"{name} {suffix}"] = {"bytes_per_token": round(s["bytes_per_token"], 2), "tokens": s["num_tokens"],
                                         "positions_with_targets": s["positions_with_targets"],
                                         "by_dataset": {k: round(v, 2) for k, v in
                                                        s["bytes_per_token_by_dataset"].items()}}
    first = next(iter(variants))
    plain_out = root / "plain"
    seconds["plain text"] = _build(teacher, plain, plain_out, variants[first])
    plain_tokens = cache_summary(plain_out)["num_tokens"]
    shutil.rmtree(root, ignore_errors=True)

    ratios: dict[str, Any] = {}
    for name in variants:
        mine, every = sizes[f"{name} assistant-only"], sizes[f"{name} all positions"]
        ratios[f"{name} assistant-only bytes/token"] = {"value": mine["bytes_per_token"], "baseline": "absolute"}
        ratios[f"{name} all-positions bytes/token"] = {"value": every["bytes_per_token"], "baseline": "absolute"}
        ratios[f"{name} assistant-only / all positions"] = ratio(mine["bytes_per_token"], every["bytes_per_token"],
                                                                 "", "all positions")
    chat_tps = sizes[f"{first} assistant-only"]["tokens"] / seconds[f"{first} assistant-only"]
    plain_tps = plain_tokens / seconds["plain text"]
    ratios["build tokens/s conversational / plain"] = ratio(chat_tps, plain_tps, "", "plain text, same text")
    return {
        "ratios": ratios,
        "sizes": sizes,
        "build_s": {k: round(v, 2) for k, v in seconds.items()},
        "build_tokens_per_s": {"conversational": round(chat_tps, 1), "plain": round(plain_tps, 1)},
        "shapes": {"max_length": MAX_LENGTH, "conversations": count, "tokens": sizes[f"{first} assistant-only"]
                   ["tokens"], "plain_tokens": plain_tokens},
        "notes": ["assistant-only caches store targets where the NEXT token is assistant content; inspect's "
                  "positions_with_targets gives the share",
                  "fp16 assistant-only target arrays are chunked by 64 positions; only the stored prefix is allocated",
                  "build time includes loading the teacher (same in both); the machine may be shared"],
    }


if __name__ == "__main__":
    raise SystemExit(run_standalone(run, "conversational cache benchmark"))
