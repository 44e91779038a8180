"""The teacher-cache contract: the ONE module both the teacher side (`cache_tools`) and the student side (`distill`)
import. Everything about the on-disk layout lives here as data: file names, the table of datasets (`DATASETS`: shape,
dtype, chunking, compression, which target kinds/encodings store it, what `verify` checks), attribute names, the
manifest (typed, in `cache_tools.format.manifest`, re-exported here) and the format version. Writer, reader, verifier,
inspector and test fixtures derive from `DATASETS`; change the layout only together with `FORMAT_VERSION`.

Layout of a cache directory (format version 3)::

    DIR/manifest.json          written last, atomically; ``complete`` is true only when every shard is present
    DIR/shard-00000.h5         shards hold contiguous runs of global sequence indices
    DIR/shard-00000.json       per-shard sidecar (a `ShardInfo`): counts, sha256 and windows digest, written after the
                               shard is renamed
    DIR/tokenizer/             the teacher tokenizer (`save_pretrained`), so the cache is self-contained
    DIR/vocab_maps/            cross-tokenizer vocabulary maps, one per (teacher, student) tokenizer pair
    DIR/*.tmp                  partial files of an interrupted build; never read, removed by ``--resume``

Datasets in each shard: see `DATASETS` (S = sequences in the shard, L = max_length, K = top_k, N = num_samples,
P = pooled layers, H = teacher hidden). Position t of a window holds the teacher's distribution over the token that
FOLLOWS token t. Encoding "fp16" stores the sparse targets and the token offsets as plain arrays; "compact" stores
each of the two as one variable-length uint8 blob per sequence (`cache_tools.format.codec`) covering the window's valid
positions only (a top-k tail_logprob stays an array). Version 1 (read, never written) = version 2 with kind "topk",
encoding "fp16", text stored as a variable-length UTF-8 string instead of bytes.

Version 3 adds packing and conversations (versions 1-2 read as: cross-document packing, one segment per window,
plain text, targets at every position):

* ``segment_lengths`` (every v3 cache): the lengths of the document pieces packed in the window, in order, summing to
  valid_length. A piece is one document's run of tokens (plain text: with the EOS that closes it; a conversation:
  its rendered tokens, no separator). Manifest ``packing`` = ``isolated``: the teacher saw each piece alone (positions
  restart at 0, block-diagonal causal mask); ``cross_document``: one causal run over the whole window.
* ``assistant_mask`` (``dataset.row_format`` != text): 1 = assistant / completion content, including the end-of-turn
  token closing the turn (and the template text between a generation prompt and the content, e.g. Qwen3's ``<think>``).
* ``target_mask`` (manifest ``targets.assistant_only``): 1 where the position stores teacher targets, i.e. where the
  NEXT token is assistant content (the last position of a piece never does). The target datasets then hold only those
  positions, in order, at the front of the row (fp16: chunks past that prefix are never allocated) or in the blob
  (compact); `encodings.decode_targets` expands them (ids -1, log-probs 0, tail 0 (top-k) / -inf (sampled)).
* ``conversation`` (conversational caches): UTF-8 JSON per window, what a student with another chat template needs
  to re-render each conversation: a list with one entry per piece, ``{"row": dataset row, "messages": [{role,
  content[, reasoning_content, tool_calls, name, tool_call_id]}...], "spans": [[message, field, start, end, offset],
  ...][, "tools": the row's tool schemas]}``; each span says that
  window text [start, end) equals ``messages[message][field][offset : offset + end - start]`` (field = "content" or
  "reasoning_content"; reasoning written inline as ``<think>...</think>`` at the start of an assistant content is
  "reasoning_content" with offsets into the content), clipped to the window (`format.conversations` finds them).
* ``window_blob`` (manifest ``window_encoding`` = ``compact``: compact caches written since it exists): the valid
  input ids and the text of each window as one `codec_window` blob bound to its row, instead of the ``input_ids``
  and ``text`` datasets (format 3 compact caches written before store those datasets and read as before).
Manifest (v3): ``packing``, ``dataset.row_format`` / ``chat_template_hash`` / ``chat_template_kwargs`` (JSON) /
``long_conversations``, ``targets.assistant_only``, ``window_encoding``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from cache_tools.format.errors import CacheError  # noqa: F401 - re-exported
from cache_tools.format.fsutil import TMP_SUFFIX, atomic_write_text, file_sha256  # noqa: F401 - re-exported for the package
from cache_tools.format.manifest import (  # noqa: F401 - the manifest is part of this contract; import it from here
    DTYPE_NAMES,
    ENCODINGS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PACKING_MODES,
    READABLE_VERSIONS,
    ROW_FORMATS,
    TARGET_KINDS,
    WINDOW_ENCODINGS,
    CacheManifest,
    DatasetInfo,
    PoolingInfo,
    RowsInfo,
    ShardInfo,
    TargetsInfo,
    TeacherInfo,
    TokenizerInfo,
    load_manifest,
    stable_hash,
)
from cache_tools.format.tokenizer_id import tokenizer_hash  # noqa: F401 - part of this contract; import it from here

SHARD_PREFIX = "shard-"
VOCAB_MAP_DIR = "vocab_maps"  # cross-tokenizer maps saved beside the cache, keyed by both tokenizer hashes
TOKENIZER_DIR = "tokenizer"  # the teacher tokenizer, saved with the cache so students never need the teacher's path
XTOK_STORE_DIR = "xtok"  # precomputed cross-tokenizer targets (`python -m distill.prepare_xtok`), beside the cache

# Dataset names (stored) and target field names (what the builder produces and the reader returns).
INPUT_IDS = "input_ids"
VALID_LENGTH = "valid_length"
DOC_INDEX = "doc_index"
TEXT = "text"
OFFSETS = "offsets"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TAIL_LOGPROB = "tail_logprob"
POOLED_HIDDEN = "pooled_hidden"
SAMPLE_IDS = "sample_ids"
SAMPLE_COUNTS = "sample_counts"
TOPK_BLOB = "topk_blob"
SAMPLE_BLOB = "sample_blob"
OFFSETS_BLOB = "offsets_blob"
WINDOW_BLOB = "window_blob"
SEGMENT_LENGTHS = "segment_lengths"
ASSISTANT_MASK = "assistant_mask"
TARGET_MASK = "target_mask"
CONVERSATION = "conversation"
# Per-token target datasets: with targets.assistant_only they hold only the target_mask positions (see above).
TARGET_FIELDS = ("topk_ids", "topk_logprobs", "tail_logprob", "sample_ids", "sample_counts")

LOGPROB_DTYPE = np.float16
TAIL_DTYPE = np.float32
POOLED_DTYPE = np.float16
OFFSET_DTYPE = np.int32
SAMPLE_COUNT_DTYPE = np.uint16  # counts of one id among N draws: N must fit
MAX_SAMPLES = int(np.iinfo(SAMPLE_COUNT_DTYPE).max)
VLEN_BYTES = h5py.vlen_dtype(np.dtype(np.uint8))  # one variable-length uint8 array per sequence
VLEN_INT32 = h5py.vlen_dtype(np.dtype(np.int32))
MASK_DTYPE = np.uint8
TEXT_V1_DTYPE = h5py.string_dtype("utf-8")  # version 1 text (cannot hold NUL); version 2 stores UTF-8 bytes
# exp(-100) is 0 in every float format we use; the floor keeps every stored value finite (k = vocab gives the floor).
TAIL_LOGPROB_FLOOR = -100.0
# Tolerance for "probabilities sum to at most 1": fp16 rounding of 256 log-probs can push the sum slightly past 1.
PROB_SUM_EPS = 2e-2
TARGET_CHUNK_POSITIONS = 64  # positions per chunk of an assistant-only cache's target arrays
SCALAR_CHUNK_ROWS = 1024  # per-sequence scalars and blob references are chunked in runs (no tiny chunks)

# Shard attribute names.
ATTR_FORMAT_VERSION = "format_version"
ATTR_SHARD_INDEX = "shard_index"
ATTR_FIRST_SEQUENCE = "first_sequence"
ATTR_NUM_SEQUENCES = "num_sequences"
ATTR_NUM_TOKENS = "num_tokens"
ATTR_TOP_K = "top_k"  # K slots per position (top_k, or N for sampled)
ATTR_MAX_LENGTH = "max_length"
ATTR_VOCAB_SIZE = "vocab_size"
ATTR_POOL_LAYERS = "pool_layers"
ATTR_TARGET_KIND = "target_kind"
ATTR_ENCODING = "target_encoding"
ATTR_NUM_SAMPLES = "num_samples"


def _ids(m: CacheManifest) -> np.dtype:
    return id_dtype_for(m.vocab_size)


def _fixed(dtype: Any) -> Callable[[CacheManifest], np.dtype]:
    return lambda m: np.dtype(dtype)


def _text_dtype(m: CacheManifest) -> np.dtype:
    return VLEN_BYTES if m.format_version >= 2 else TEXT_V1_DTYPE


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a shard. Stored shape is [S, *shape(m)]; `per_token` datasets have L as their first
    per-sequence axis (the reader trims them to the window's valid length); `vlen` ones hold one uint8 array per
    sequence. `kinds` / `encodings` say which caches store it. `checks` name what `verify` checks on it."""

    name: str
    shape: Callable[[CacheManifest], tuple[int, ...]]
    dtype: Callable[[CacheManifest], np.dtype]
    per_token: bool
    doc: str
    kinds: tuple[str, ...] = TARGET_KINDS
    encodings: tuple[str, ...] = ENCODINGS
    checks: tuple[str, ...] = ()
    when: Callable[[CacheManifest], bool] = lambda m: True  # any other condition on the cache (version, row format)

    def stored_in(self, m: CacheManifest) -> bool:
        return m.targets.kind in self.kinds and m.targets.encoding in self.encodings and self.when(m)

    def is_vlen(self, m: CacheManifest) -> bool:
        return h5py.check_vlen_dtype(self.dtype(m)) is not None or h5py.check_string_dtype(self.dtype(m)) is not None

    def chunks(self, m: CacheManifest, capacity: int) -> tuple[int, ...]:
        """One sequence per chunk for arrays (a reader fetching a sequence touches exactly its chunks); runs of
        sequences for scalars and blob references."""
        shape = self.shape(m)
        if self.sparse_rows(m):  # only the stored prefix of a row is written: chunks past it are never allocated
            return (1, min(shape[0], TARGET_CHUNK_POSITIONS), *shape[1:])
        return (1, *shape) if shape else (max(1, min(capacity, SCALAR_CHUNK_ROWS)),)

    def sparse_rows(self, m: CacheManifest) -> bool:
        """A per-token target array of an assistant-only cache: each row holds its target positions at the front."""
        return self.per_token and self.name in TARGET_FIELDS and m.targets.assistant_only

    def compressed(self, m: CacheManifest) -> bool:
        """--compression applies to array datasets; HDF5 filters never reach variable-length heap data."""
        return bool(self.shape(m))


DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec(INPUT_IDS, lambda m: (m.max_length,), _ids, True, "teacher token ids; 0 past valid_length",
                checks=("ids_below_vocab",), when=lambda m: not compact_windows(m)),
    DatasetSpec(VALID_LENGTH, lambda m: (), _fixed(np.int32), False, "real tokens in the window (1..L)",
                checks=("length_range", "token_count")),
    DatasetSpec(DOC_INDEX, lambda m: (), _fixed(np.int64), False, "source document of the window's first token"),
    DatasetSpec(TEXT, lambda m: (), _text_dtype, False, "the window's text as UTF-8 bytes (NUL-safe); offsets index "
                "its characters", checks=("utf8",), when=lambda m: not compact_windows(m)),
    DatasetSpec(WINDOW_BLOB, lambda m: (), lambda m: VLEN_BYTES, False,
                "codec_window.encode_window of the valid input ids and the text (instead of input_ids and text)",
                encodings=("compact",), checks=("ids_below_vocab", "utf8"), when=lambda m: compact_windows(m)),
    DatasetSpec(OFFSETS, lambda m: (m.max_length, 2), _fixed(OFFSET_DTYPE), True,
                "(start, end) character offsets of each teacher token in text; 0 past valid_length",
                encodings=("fp16",), checks=("offsets_in_text",)),
    DatasetSpec(OFFSETS_BLOB, lambda m: (), lambda m: VLEN_BYTES, False,
                "codec.encode_offsets of the valid positions' offsets (lossless; read back as int32 [n, 2])",
                encodings=("compact",), checks=("offsets_in_text",)),
    DatasetSpec(TOPK_IDS, lambda m: (m.max_length, m.targets.top_k), _ids, True,
                "top-k ids, sorted by log-prob descending", kinds=("topk",), encodings=("fp16",),
                checks=("topk_targets",)),
    DatasetSpec(TOPK_LOGPROBS, lambda m: (m.max_length, m.targets.top_k), _fixed(LOGPROB_DTYPE), True,
                "log-probs over the TRUE vocabulary", kinds=("topk",), encodings=("fp16",), checks=("topk_targets",)),
    DatasetSpec(TOPK_BLOB, lambda m: (), lambda m: VLEN_BYTES, False,
                "codec.encode_topk of the valid positions' ids + log-probs", kinds=("topk",), encodings=("compact",),
                checks=("topk_targets",)),
    DatasetSpec(TAIL_LOGPROB, lambda m: (m.max_length,), _fixed(TAIL_DTYPE), True,
                "log(1 - sum exp(topk)) computed exactly from the logits, floored at TAIL_LOGPROB_FLOOR",
                kinds=("topk",), checks=("topk_targets",)),
    DatasetSpec(SAMPLE_IDS, lambda m: (m.max_length, m.targets.num_samples), _ids, True,
                "distinct sampled ids (0 where the count is 0)", kinds=("sampled",), encodings=("fp16",),
                checks=("sampled_targets",)),
    DatasetSpec(SAMPLE_COUNTS, lambda m: (m.max_length, m.targets.num_samples), _fixed(SAMPLE_COUNT_DTYPE), True,
                "draws of each id among N (sum N per position)", kinds=("sampled",), encodings=("fp16",),
                checks=("sampled_targets",)),
    DatasetSpec(SAMPLE_BLOB, lambda m: (), lambda m: VLEN_BYTES, False,
                "codec.encode_sampled of the valid positions' ids + counts", kinds=("sampled",),
                encodings=("compact",), checks=("sampled_targets",)),
    DatasetSpec(SEGMENT_LENGTHS, lambda m: (), lambda m: VLEN_INT32, False,
                "lengths of the document pieces packed in the window (sum valid_length)", checks=("segments",),
                when=lambda m: m.format_version >= 3),
    DatasetSpec(ASSISTANT_MASK, lambda m: (m.max_length,), _fixed(MASK_DTYPE), True,
                "1 = assistant/completion token (end-of-turn included); 0 past valid_length", checks=("masks",),
                when=lambda m: is_conversational(m)),
    DatasetSpec(TARGET_MASK, lambda m: (m.max_length,), _fixed(MASK_DTYPE), True,
                "1 = position stores teacher targets (its next token is assistant content)", checks=("masks",),
                when=lambda m: m.targets.assistant_only),
    DatasetSpec(CONVERSATION, lambda m: (), lambda m: VLEN_BYTES, False,
                "UTF-8 JSON: each piece's messages and content spans in the window text", checks=("conversation",),
                when=lambda m: is_conversational(m)),
    DatasetSpec(POOLED_HIDDEN, lambda m: (len(m.pooling.layers), m.pooling.hidden_size), _fixed(POOLED_DTYPE),
                False, "masked mean of each pooled layer over valid tokens, computed in fp32",
                checks=("pooled_finite",)),
)


def compact_windows(m: CacheManifest) -> bool:
    """Input ids and text stored as one `codec_window` blob per sequence (manifest window_encoding "compact")."""
    return m.format_version >= 3 and m.window_encoding == "compact"


def window_encoding_for(targets: TargetsInfo) -> str:
    """What a build of the current format records as its window_encoding: compact caches store windows compactly."""
    return "compact" if targets.encoding == "compact" else "arrays"


def is_conversational(m: CacheManifest) -> bool:
    return m.format_version >= 3 and m.dataset.row_format != "text"


def datasets_for(m: CacheManifest) -> tuple[DatasetSpec, ...]:
    """The datasets a shard of this cache holds, in table order."""
    return tuple(spec for spec in DATASETS if spec.stored_in(m))


def dataset_names(m: CacheManifest) -> tuple[str, ...]:
    return tuple(spec.name for spec in datasets_for(m))


def shard_attrs(m: CacheManifest) -> dict[str, Any]:
    """Attributes every shard of this cache carries (plus index / first sequence / counts written by the writer)."""
    return {
        ATTR_FORMAT_VERSION: m.format_version,
        ATTR_TARGET_KIND: m.targets.kind,
        ATTR_ENCODING: m.targets.encoding,
        ATTR_TOP_K: m.targets.slots,
        ATTR_NUM_SAMPLES: m.targets.num_samples,
        ATTR_MAX_LENGTH: m.max_length,
        ATTR_VOCAB_SIZE: m.vocab_size,
        ATTR_POOL_LAYERS: np.asarray(m.pooling.layers, dtype=np.int64),
    }


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.h5"


def shard_sidecar_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.json"


def id_dtype_for(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id of a vocabulary of `vocab_size` tokens."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)
