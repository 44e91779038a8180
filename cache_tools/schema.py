"""The teacher-cache contract: the ONE module both the teacher side (`cache_tools`) and the student side (`distill`)
import. Everything about the on-disk layout lives here: file names, dataset names and shapes, dtypes, attribute names,
the manifest, and the format version. Change the layout only together with `FORMAT_VERSION`.

Layout of a cache directory (format version 1)::

    DIR/manifest.json          written last, atomically; ``complete`` is true only when every shard is present
    DIR/shard-00000.h5         shards hold contiguous runs of global sequence indices
    DIR/shard-00000.json       per-shard sidecar (a `ShardInfo`): counts + sha256, written after the shard is renamed
    DIR/tokenizer/             the teacher tokenizer (`save_pretrained`), so the cache is self-contained
    DIR/vocab_maps/            cross-tokenizer vocabulary maps, one per (teacher, student) tokenizer pair
    DIR/*.tmp                  partial files of an interrupted build; never read, removed by ``--resume``

Datasets in each shard (S = sequences in the shard, L = max_length, K = top_k, P = pooled layers, H = teacher hidden):

    input_ids      [S, L]     id dtype   teacher token ids; 0 past ``valid_length``
    valid_length   [S]        int32      number of real tokens in the window (1..L)
    doc_index      [S]        int64      index of the source document of the window's first token
    text           [S]        utf-8 str  the window's text; teacher offsets index into it
    offsets        [S, L, 2]  int32      (start, end) character offsets of each teacher token in ``text``
    topk_ids       [S, L, K]  id dtype   teacher top-k token ids, sorted by log-probability, descending
    topk_logprobs  [S, L, K]  float16    log-probabilities normalised over the TRUE tokenizer vocabulary
    tail_logprob   [S, L]     float32    log(1 - sum exp(topk)) computed exactly from the logits (logsumexp of the
                                          non-top-k logits), floored at `TAIL_LOGPROB_FLOOR`
    pooled_hidden  [S, P, H]  float16    masked mean of each pooled layer over valid tokens, computed in fp32

Position t of a window holds the teacher's distribution over the token that FOLLOWS token t.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.errors import UserError
from cache_tools.fsutil import atomic_write_text, file_sha256  # noqa: F401 - re-exported for the rest of the package

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "shard-"
TMP_SUFFIX = ".tmp"
VOCAB_MAP_DIR = "vocab_maps"  # cross-tokenizer maps saved beside the cache, keyed by both tokenizer hashes
TOKENIZER_DIR = "tokenizer"  # the teacher tokenizer, saved with the cache so students never need the teacher's path

# Dataset names.
INPUT_IDS = "input_ids"
VALID_LENGTH = "valid_length"
DOC_INDEX = "doc_index"
TEXT = "text"
OFFSETS = "offsets"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TAIL_LOGPROB = "tail_logprob"
POOLED_HIDDEN = "pooled_hidden"
ALL_DATASETS = (INPUT_IDS, VALID_LENGTH, DOC_INDEX, TEXT, OFFSETS, TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGPROB, POOLED_HIDDEN)

LOGPROB_DTYPE = np.float16
TAIL_DTYPE = np.float32
POOLED_DTYPE = np.float16
OFFSET_DTYPE = np.int32
# exp(-100) is 0 in every float format we use; the floor keeps every stored value finite (k = vocab gives the floor).
TAIL_LOGPROB_FLOOR = -100.0
# Tolerance for "probabilities sum to at most 1": fp16 rounding of 256 log-probs can push the sum slightly past 1.
PROB_SUM_EPS = 2e-2

# Shard attribute names.
ATTR_FORMAT_VERSION = "format_version"
ATTR_SHARD_INDEX = "shard_index"
ATTR_FIRST_SEQUENCE = "first_sequence"
ATTR_NUM_SEQUENCES = "num_sequences"
ATTR_NUM_TOKENS = "num_tokens"
ATTR_TOP_K = "top_k"
ATTR_MAX_LENGTH = "max_length"
ATTR_VOCAB_SIZE = "vocab_size"
ATTR_POOL_LAYERS = "pool_layers"


class CacheError(UserError):
    """A problem with a cache directory or its contents. The message is one line naming the file and the fix."""


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.h5"


def shard_sidecar_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.json"


def id_dtype_for(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id of a vocabulary of `vocab_size` tokens."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across processes and runs)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of a HF tokenizer: vocabulary, merges/normaliser/pre-tokeniser (fast tokenizers) and special
    tokens. Two tokenizers with the same hash split every text identically; loading the same files twice, or from a
    hub id vs a local copy, gives the same hash."""
    payload: dict[str, Any] = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Runtime settings, not content: they change with how the tokenizer is called, not how it splits text.
        for key in ("truncation", "padding"):
            spec.pop(key, None)
        payload["backend"] = spec
    return stable_hash(payload)


@dataclass
class ShardInfo:
    """One shard's entry in the manifest (and its sidecar JSON)."""

    file: str
    index: int
    first_sequence: int
    num_sequences: int
    num_tokens: int
    bytes: int
    sha256: str
    # Which build wrote the shard (`CacheManifest.build_id`); --resume keeps only shards of its own build.
    build_id: str = ""


@dataclass
class CacheManifest:
    """`manifest.json`. `settings()` is what must match for `--resume` and what a student run depends on."""

    format_version: int = FORMAT_VERSION
    builder_version: str = ""
    complete: bool = False
    # {name_or_path, config_hash, model_type, hidden_size, num_hidden_layers, head_rows}
    teacher: dict[str, Any] = field(default_factory=dict)
    # {name_or_path, content_hash, vocab_size (true size = len(tokenizer)), special_ids {bos,eos,pad,unk},
    #  special_tokens {bos,eos,pad,unk: str}}
    tokenizer: dict[str, Any] = field(default_factory=dict)
    top_k: int = 256
    max_length: int = 512
    id_dtype: str = "uint32"
    # {method: "masked_mean", layers: [hidden_states indices, 0 = embeddings], hidden_size}
    pooling: dict[str, Any] = field(default_factory=dict)
    # {spec, split, text_column, max_samples, streaming, fingerprint}
    dataset: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = "fp32"
    # Windows per teacher batch: padding to each batch's longest window changes results in the last bits, so a
    # resumed build must use the same value to equal an uninterrupted one.
    batch_size: int = 0
    shard_size: int = 1024
    compression: str = "none"
    num_sequences: int = 0
    num_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    created_at: str = ""
    # "<settings hash>-<random>", fixed when a build starts and kept across resumes (see cache_tools.output_dir).
    build_id: str = ""

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.tokenizer["content_hash"])

    def settings(self) -> dict[str, Any]:
        """Everything that decides the cache's contents (a resumed build must match it exactly)."""
        return {
            "format_version": self.format_version,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "top_k": self.top_k,
            "max_length": self.max_length,
            "pooling": self.pooling,
            "dataset": self.dataset,
            "compute_dtype": self.compute_dtype,
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            "compression": self.compression,
        }

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheManifest:
        data = dict(data)
        data["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, cache_dir: str | os.PathLike) -> None:
        atomic_write_text(Path(cache_dir) / MANIFEST_NAME, self.to_json())


def load_manifest(cache_dir: str | os.PathLike) -> CacheManifest:
    """Read `DIR/manifest.json`; raises `CacheError` (one line, naming the file and the fix) on any problem."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not Path(cache_dir).is_dir():
        raise CacheError(f"{cache_dir}: no such cache directory; build one with `cache_tools build-cache`")
    if not path.is_file():
        raise CacheError(f"{path}: missing; this is not a finished cache (rerun `cache_tools build-cache --resume`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = sorted(set(CacheManifest().settings()) - set(data))
        if missing:
            raise KeyError(f"missing key {missing[0]!r}")
        manifest = CacheManifest.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, AttributeError) as err:
        raise CacheError(f"{path}: unreadable manifest ({err}); rerun the same build-cache command with --resume "
                         "(it rebuilds the manifest from the shards' sidecars) or rebuild with --overwrite") from err
    if manifest.format_version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: format version {manifest.format_version!r}, this tool reads {FORMAT_VERSION}; rebuild the cache"
        )
    return manifest
