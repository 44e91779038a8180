"""Shared fixtures: a locally trained tokenizer and tiny randomly initialised teacher/student saved with
`save_pretrained`, so tests go through the same `from_pretrained` path users do. Nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Records of verified shards (cache_tools.format.shard_check) go to a temp folder, not the user's ~/.cache.
os.environ.setdefault("DISTILL_VERIFIED_DIR", os.path.join(tempfile.gettempdir(), f"distill-verified-{os.getuid()}"))

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"

TOKENIZER_VOCAB = 512
TEACHER_PADDED_ROWS = 64  # the teacher head has more rows than the tokenizer has tokens, like Qwen's


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from examples.tiny_models import stdlib_docstrings

    return stdlib_docstrings(max_docs=400)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    from examples.tiny_models import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(corpus, TOKENIZER_VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """Tiny Qwen3-MoE teacher; its head has TEACHER_PADDED_ROWS more rows than the tokenizer's true vocabulary."""
    from examples.tiny_models import save_random_model, tiny_qwen3_moe_config

    cfg = tiny_qwen3_moe_config(len(tokenizer) + TEACHER_PADDED_ROWS)
    return save_random_model(cfg, tmp_path_factory.mktemp("teacher"), tokenizer, seed=0)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    """Tiny Llama student (tied embeddings, like SmolLM) sharing the teacher's tokenizer."""
    from examples.tiny_models import save_random_model, tiny_llama_config

    cfg = tiny_llama_config(len(tokenizer))
    return save_random_model(cfg, tmp_path_factory.mktemp("student"), tokenizer, seed=1)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, corpus) -> Path:
    """A small local `.txt` dataset (one document per line, as `datasets`' text loader reads it)."""
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n".join(d.replace("\n", " ") for d in corpus[:60]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present (optional real-text data)")
    return path


@pytest.fixture(scope="session")
def other_student(tmp_path_factory, corpus) -> Path:
    """A student with a different vocabulary size AND pre-tokenisation rule (digits split) than the teacher's
    tokenizer: the cross-tokenizer path. Read-only, so one serves every module."""
    from examples.tiny_models import save_random_model, tiny_llama_config, train_bpe_tokenizer

    tok = train_bpe_tokenizer(corpus[:200], 384, split_digits=True)
    return save_random_model(tiny_llama_config(len(tok)), tmp_path_factory.mktemp("other_student"), tok, seed=3)


@pytest.fixture(scope="module")
def small_topk_cache(tmp_path_factory, teacher_dir, text_file) -> Path:
    """A real top-16 cache built from the tiny teacher (12 documents, 64-token windows); one per module, since tests
    write beside it (e.g. a precomputed cross-tokenizer store)."""
    from cache_tools.builder import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("small_topk_cache") / "cache"
    build_cache(BuildOptions(teacher=str(teacher_dir), dataset=str(text_file), output=str(out), max_length=64,
                             top_k=16, batch_size=4, shard_size=8, max_samples=12, progress=False))
    return out
