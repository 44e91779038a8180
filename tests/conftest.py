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
