"""The chat demo's conversations and tokenizers, built offline from the Python standard library's docstrings.

Each conversation asks about one documented function or class ("What does json.dumps do?") and the assistant answers
with the first paragraph of its docstring; when the docstring has a second paragraph the user asks for more and the
assistant gives it (a second turn). A third of the conversations open with a system message. Teacher and student get
different byte-level BPE tokenizers (other vocabulary size and pre-tokenisation) and different chat templates: the
teacher's is Qwen3-shaped (ChatML headers, an empty think block before each answer), the student's Zephyr-shaped
(<|user|> / <|assistant|> headers, a default system turn), so a conversation renders to different text on each side.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path
from typing import Any

TEACHER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)
STUDENT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>\nYou are a helpful assistant.<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEACHER_SPECIALS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
STUDENT_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
QUESTIONS = ("What does {name} do?", "Explain {name} briefly.", "What is {name} for?", "Describe {name}.")
FOLLOW_UPS = ("Tell me more.", "Anything else?", "Go on.")
SYSTEM = "You answer questions about the Python standard library."


def documented_names(max_items: int) -> list[tuple[str, list[str]]]:
    """(qualified name, paragraphs) of documented functions and classes of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, list[str]]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3") for p in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            paragraphs = [" ".join(p.split()) for p in (doc or "").split("\n\n") if p.strip()]
            if paragraphs and 60 <= len(paragraphs[0]) <= 400:
                out.append((f"{module}.{node.name}", [p[:400] for p in paragraphs[:2]]))
                if len(out) >= max_items:
                    return out
    return out


def conversations(max_items: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows in TRL's conversational format: {"messages": [{role, content}, ...]}."""
    rng = random.Random(seed)
    rows = []
    for name, paragraphs in documented_names(max_items):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
        messages.append({"role": "user", "content": rng.choice(QUESTIONS).format(name=name)})
        messages.append({"role": "assistant", "content": paragraphs[0]})
        if len(paragraphs) > 1:
            messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
            messages.append({"role": "assistant", "content": paragraphs[1]})
        rows.append({"messages": messages})
    return rows


def split_rows(rows: list[dict[str, Any]], every: int = 10) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held out): every `every`-th conversation is held out."""
    return ([r for i, r in enumerate(rows) if i % every], [r for i, r in enumerate(rows) if i % every == 0])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train_tokenizer(texts: list[str], vocab_size: int, specials: tuple[str, ...], template: str, out: Path, *,
                    split_digits: bool = False) -> Path:
    """A byte-level BPE tokenizer with the chat specials and `template`, saved to `out`."""
    from examples.tiny_models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab_size, split_digits=split_digits, extra_special=specials)
    tok.chat_template = template
    tok.save_pretrained(out)
    return out


def rendered_texts(tokenizer: Any, rows: list[dict[str, Any]]) -> list[str]:
    return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
