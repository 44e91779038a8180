"""Demo inputs: the text (the standard library's docstrings by default, or the user's data) split deterministically
into train and held-out documents, the locally trained tokenizers, and the teacher/student model configs."""

from __future__ import annotations

import json
from pathlib import Path

from cache_tools.format.fsutil import atomic_path, atomic_write_text

EVAL_EVERY = 20  # every 20th document is held out: deterministic, and spread over the whole corpus (all modules)


def load_texts(text_file: str | None, dataset: str | None, max_docs: int | None, min_chars: int) -> list[str]:
    """The demo's documents, in a fixed order. Default: stdlib docstrings (every Python install has them)."""
    if text_file or dataset:
        from cache_tools.format.text_data import load_documents

        spec = text_file or dataset
        try:
            docs = [text for _, text in load_documents(spec, max_samples=max_docs) if text.strip()]
        except ValueError as err:
            # load_documents names the spec as build-cache's flag; name the flag the user gave the demo instead.
            raise ValueError(str(err).replace("--dataset", "--text-file", 1) if text_file else str(err)) from err
        if len(docs) < 2 * EVAL_EVERY:
            flag = "--text-file" if text_file else "--dataset"
            raise ValueError(f"{flag} {spec}: only {len(docs)} non-empty documents; the demo needs at least "
                             f"{2 * EVAL_EVERY} (one per line in a .txt file)")
        return docs
    from examples.tiny_models import stdlib_docstrings

    return stdlib_docstrings(min_chars=min_chars, max_docs=max_docs)


def split_docs(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out): document i is held out when i % EVAL_EVERY == EVAL_EVERY - 1."""
    train = [d for i, d in enumerate(docs) if i % EVAL_EVERY != EVAL_EVERY - 1]
    held_out = [d for i, d in enumerate(docs) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return train, held_out


def write_jsonl(path: Path, docs: list[str]) -> Path:
    """One {"text": ...} record per document (jsonl keeps newlines inside documents, a .txt file would not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path, *, split_digits: bool = False) -> Path:
    """Byte-level BPE trained on the training documents only, saved with `save_pretrained` (into a temp folder,
    renamed when complete)."""
    from examples.tiny_models import train_bpe_tokenizer

    with atomic_path(out_dir) as tmp:
        train_bpe_tokenizer(docs, vocab_size, split_digits=split_digits).save_pretrained(tmp)
    return out_dir


def write_model_configs(out_dir: Path, teacher_vocab: int, student_vocab: int, *, teacher_hidden: int,
                        teacher_layers: int, student_hidden: int, student_layers: int,
                        max_length: int) -> tuple[Path, Path]:
    """config.json files for the Qwen3-MoE teacher and the Llama (SmolLM-shaped) student; the trainer starts each
    from its config with `--student_config`."""
    from examples.tiny_models import tiny_llama_config, tiny_qwen3_moe_config

    teacher = tiny_qwen3_moe_config(teacher_vocab, hidden_size=teacher_hidden, layers=teacher_layers,
                                    max_positions=max_length)
    student = tiny_llama_config(student_vocab, hidden_size=student_hidden, layers=student_layers,
                                max_positions=max_length)
    paths = []
    for name, cfg in (("teacher", teacher), ("student", student)):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        paths.append(folder / "config.json")
    return paths[0], paths[1]


def count_params(config_path: Path) -> int:
    """Parameter count of a model built from `config_path` (meta device: nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_path.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())
