"""Small, offline building blocks shared by the demo, the benchmarks and the tests: real text every Python install
carries (the standard library's docstrings), byte-level BPE tokenizers trained locally, and tiny model configs with
the shapes of real teacher/student pairs. Nothing here downloads anything."""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def stdlib_docstrings(min_chars: int = 200, max_docs: int | None = None) -> list[str]:
    """Module, class and function docstrings of the standard library's `.py` files, in a deterministic order.

    Parsed with `ast` (nothing is imported). About 3.6 MB of English technical prose on CPython 3.11."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
                    if max_docs is not None and len(docs) >= max_docs:
                        return docs
    return docs


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    split_digits: bool = False,
    extra_special: Iterable[str] = (),
):
    """Train a byte-level BPE tokenizer (GPT-2/Qwen style) and wrap it as a `PreTrainedTokenizerFast` with
    `<|endoftext|>` as EOS (and pad). `split_digits` changes the pre-tokenisation rule, so two tokenizers trained on the
    same text split it differently (useful for cross-tokenizer tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if split_digits:
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre) if len(pre) > 1 else pre[0]
    tok.decoder = decoders.ByteLevel()
    special = [EOS, *extra_special]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)


def tiny_qwen3_moe_config(vocab_rows: int, *, hidden_size: int = 64, layers: int = 2, max_positions: int = 512):
    """A Qwen3-MoE teacher of a few hundred thousand parameters. `vocab_rows` may exceed the tokenizer's size (Qwen
    pads its head to 151,936 rows): those padded rows must never become cache candidates."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def tiny_llama_config(vocab_rows: int, *, hidden_size: int = 48, layers: int = 2, max_positions: int = 512):
    """A SmolLM-shaped (Llama, tied embeddings) student."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )


def save_random_model(config, path: str | os.PathLike, tokenizer=None, seed: int = 0) -> Path:
    """Randomly initialise `AutoModelForCausalLM.from_config(config)` with `seed` and `save_pretrained` it (plus the
    tokenizer) to `path`, so tests exercise the same `from_pretrained` path as real hub models."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
