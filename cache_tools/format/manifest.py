"""`manifest.json` as typed nested dataclasses (part of the format contract; `cache_tools.format.schema` re-exports it).

Loading checks every key and its type against the dataclasses, so a hand-edited or damaged manifest is a one-line
`CacheError` naming the file and the key, never a KeyError deep inside a reader. Version 1 manifests (top-k only,
top-level ``top_k``) are mapped to the version 2 classes on load (kind "topk", encoding "fp16").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_tools.format import conversations
from cache_tools.format.errors import CacheError
from cache_tools.format.fsutil import atomic_write_text
from cache_tools.format.typed_json import load_dataclass

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # older ones are read through `_upgrade_v1` / `_upgrade_v2`
MANIFEST_NAME = "manifest.json"

TARGET_KINDS = ("topk", "sampled")
ENCODINGS = ("fp16", "compact")
# How a shard stores what its windows are: "arrays" (input_ids + text datasets) or "compact" (one codec_window blob
# per sequence; compact caches from format 3 on). Caches whose manifest does not say are "arrays".
WINDOW_ENCODINGS = ("arrays", "compact")
# Precision names a manifest records (`teacher.dtype`) and both command lines take, with their torch dtype names.
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# isolated: no token attends across the documents packed in a window (per-document positions, block-diagonal mask).
PACKING_MODES = ("isolated", "cross_document")
ROW_FORMATS = ("text", *conversations.ROW_FORMATS)


@dataclass
class ShardInfo:
    """One shard's entry in the manifest (and its sidecar JSON). Keys unchanged since version 1, so an old reader
    gets as far as its version check on a version 2 manifest."""

    file: str
    index: int
    first_sequence: int
    num_sequences: int
    num_tokens: int
    bytes: int
    sha256: str
    # sha256 of what the windows are (ids, valid lengths, text; `cache_tools.format.windows`), so caches of several
    # teachers can be checked to cover the same windows without reading targets. "" before version 3.
    windows_digest: str = ""


@dataclass
class TeacherInfo:
    name_or_path: str = ""
    config_hash: str = ""
    model_type: str = ""
    hidden_size: int = 0
    num_hidden_layers: int = 0
    head_rows: int = 0  # rows of the LM head; may exceed the tokenizer's vocabulary (padded, sliced off)


@dataclass
class TokenizerInfo:
    name_or_path: str = ""
    content_hash: str = ""
    vocab_size: int = 0  # true size = len(tokenizer); ids are < vocab_size
    special_ids: dict[str, int | None] = field(default_factory=dict)  # bos/eos/pad/unk
    special_tokens: dict[str, str | None] = field(default_factory=dict)


@dataclass
class PoolingInfo:
    method: str = "masked_mean"
    layers: list[int] = field(default_factory=list)  # hidden_states indices, 0 = embeddings
    hidden_size: int = 0


@dataclass
class DatasetInfo:
    spec: str = ""
    split: str = "train"
    text_column: str = "text"
    max_samples: int | None = None
    streaming: bool = False
    fingerprint: str = ""
    row_format: str = "text"  # one of ROW_FORMATS
    chat_template_hash: str = ""  # sha256 of the template conversations were rendered with ("" for text)
    chat_template_kwargs: str = "{}"  # canonical JSON of the extra apply_chat_template arguments
    long_conversations: str = "split"  # split (like a long document, masks carried) | skip


@dataclass
class RowsInfo:
    """What a build read from its dataset: rows read, and rows skipped because they hold no text (the text field is
    missing or null), with where the first of those is ("line N of FILE" or "row N")."""

    read: int = 0
    without_text: int = 0
    first_without_text: str = ""


@dataclass
class TargetsInfo:
    """What each position stores. kind "topk": the K most likely tokens + exact tail mass; kind "sampled": the
    distinct ids among `num_samples` draws (with replacement, at `sample_temperature`, seeded by `seed` and the
    global sequence index) and their counts. `encoding` "fp16" = plain arrays, "compact" = one packed blob per
    sequence (`cache_tools.format.codec`)."""

    kind: str = "topk"
    encoding: str = "fp16"
    top_k: int = 256  # 0 for sampled
    num_samples: int = 0  # N, 0 for top-k
    sample_temperature: float = 1.0
    seed: int = 0
    # Targets stored only at positions whose NEXT token is assistant content (`target_mask`); the rest carry none.
    assistant_only: bool = False

    @property
    def slots(self) -> int:
        """K: target slots per position as the reader returns them (top_k, or N for sampled, padded with -1)."""
        return self.top_k if self.kind == "topk" else self.num_samples


@dataclass
class CacheManifest:
    """`manifest.json`. `settings()` is what must match for `--resume` and what a student run depends on."""

    format_version: int = FORMAT_VERSION
    builder_version: str = ""
    complete: bool = False
    teacher: TeacherInfo = field(default_factory=TeacherInfo)
    tokenizer: TokenizerInfo = field(default_factory=TokenizerInfo)
    targets: TargetsInfo = field(default_factory=TargetsInfo)
    max_length: int = 512
    id_dtype: str = "uint32"
    pooling: PoolingInfo = field(default_factory=PoolingInfo)
    dataset: DatasetInfo = field(default_factory=DatasetInfo)
    compute_dtype: str = "fp32"
    # Windows per teacher batch: padding to each batch's longest window changes results in the last bits, so a
    # resumed build must use the same value to equal an uninterrupted one.
    batch_size: int = 0
    shard_size: int = 1024
    compression: str = "none"
    window_encoding: str = "arrays"  # one of WINDOW_ENCODINGS
    packing: str = "cross_document"  # one of PACKING_MODES
    num_sequences: int = 0
    num_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    created_at: str = ""
    # "<settings hash>-<random>", fixed when a build starts, kept across resumes, recorded in every sidecar (see
    # cache_tools.output_dir). Optional on load: caches written before it existed have none.
    build_id: str = ""
    # Not a setting (it follows from the dataset): what `inspect` reports about skipped rows. Optional on load.
    rows: RowsInfo = field(default_factory=RowsInfo)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.content_hash

    @property
    def slots(self) -> int:
        """K target slots per position (see `TargetsInfo.slots`): top_k, or N for sampled targets."""
        return self.targets.slots

    def settings(self) -> dict[str, Any]:
        """Everything that decides the cache's contents (a resumed build must match it exactly), flattened to
        dotted keys ("targets.top_k") so a mismatch can be named precisely."""
        return _flat_settings(dataclasses.asdict(self))

    def settings_key(self) -> str:
        """16 hex digits over `settings()`: the prefix of the id of a build with these settings."""
        return stable_hash(self.settings())[:16]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> CacheManifest:
        """Typed manifest from parsed JSON (any readable version); raises CacheError naming `where` and the key."""
        if not isinstance(data, dict):
            raise CacheError(f"{where}: not a JSON object; rebuild the cache with --overwrite")
        version = data.get("format_version")
        if version is None:
            raise CacheError(f"{where}: key format_version missing; rebuild the cache with --overwrite")
        if isinstance(version, str) or not isinstance(version, int) or isinstance(version, bool):
            raise CacheError(f"{where}: format_version is {version!r} ({type(version).__name__}), it must be an "
                             f"integer such as {FORMAT_VERSION}; restore the manifest or rebuild the cache")
        if version not in READABLE_VERSIONS:
            fix = "upgrade cache_tools/distill" if version > FORMAT_VERSION else "rebuild the cache"
            raise CacheError(f"{where}: format version {version}, this tool reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; {fix}")
        upgraded = _upgrade_v2(_upgrade_v1(data, where) if version == 1 else data) if version < 3 else data
        loaded = _load(cls, upgraded, where, "")
        _check_build_id(data, where)  # after the structure: a missing key is named as such
        return loaded

    def save(self, cache_dir: str | os.PathLike) -> None:
        atomic_write_text(Path(cache_dir) / MANIFEST_NAME, self.to_json())


_SETTINGS_KEYS = ("format_version", "teacher", "tokenizer", "targets", "max_length", "pooling", "dataset",
                  "compute_dtype", "batch_size", "shard_size", "compression", "packing", "window_encoding")


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across processes and runs)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _flat_settings(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key in _SETTINGS_KEYS:
        if key not in data:  # a key added to the settings later than the manifest was written
            continue
        if isinstance(data[key], dict):
            flat.update({f"{key}.{sub}": value for sub, value in data[key].items()})
        else:
            flat[key] = data[key]
    return flat


def _check_build_id(data: dict[str, Any], where: str) -> None:
    """A manifest written by `build-cache` names its build, and the build id starts with the hash of the settings it
    was built with. Settings that no longer hash to it were changed after the build (a hand edit: say an encoding
    that is not the shards'), so nothing else in the file can be trusted either. Hashed from the JSON as written, so a
    manifest of an older version still matches its own id after the dataclasses gained fields."""
    build_id = data.get("build_id")
    if not isinstance(build_id, str) or not build_id:
        return  # written before build ids existed, or not by build-cache
    if not build_id.startswith(stable_hash(_flat_settings(data))[:16] + "-"):
        raise CacheError(f"{where}: its settings were changed after build {build_id} wrote it (they no longer match "
                         "its build id); rerun that build's command with --resume: it rebuilds the manifest from the "
                         "shards' sidecars")


def _upgrade_v1(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A version 1 manifest in version 2 shape: top-level top_k becomes targets (top-k, fp16 layout)."""
    data = dict(data)
    if "top_k" not in data:
        raise CacheError(f"{where}: key top_k missing (format version 1); rebuild the cache with --overwrite")
    data["targets"] = {"kind": "topk", "encoding": "fp16", "top_k": data.pop("top_k"), "num_samples": 0,
                       "sample_temperature": 1.0, "seed": 0}
    return data


def _upgrade_v2(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1-2 manifest in version 3 shape: plain text packed across documents, targets at every position."""
    data = dict(data)
    data.setdefault("packing", "cross_document")
    if isinstance(data.get("dataset"), dict):
        data["dataset"] = {"row_format": "text", "chat_template_hash": "", "chat_template_kwargs": "{}",
                           "long_conversations": "split", **data["dataset"]}
    if isinstance(data.get("targets"), dict):
        data["targets"] = {"assistant_only": False, **data["targets"]}
    return data


# Added within version 2 (build_id, rows) or in version 3 (windows_digest, window_encoding); absent from caches
# written before.
_OPTIONAL_KEYS = ("build_id", "rows", "windows_digest", "window_encoding")


_CHOICES: dict[type, tuple[tuple[str, tuple[str, ...]], ...]] = {
    TargetsInfo: (("kind", TARGET_KINDS), ("encoding", ENCODINGS)),
    CacheManifest: (("packing", PACKING_MODES), ("window_encoding", WINDOW_ENCODINGS)),
    DatasetInfo: (("row_format", ROW_FORMATS), ("long_conversations", ("split", "skip"))),
}


def _load(cls: type, data: Any, where: str, prefix: str) -> Any:
    return load_dataclass(cls, data, where, prefix, optional=_OPTIONAL_KEYS, choices=_CHOICES)


def load_manifest(cache_dir: str | os.PathLike) -> CacheManifest:
    """Read `DIR/manifest.json`; raises `CacheError` (one line, naming the file and the fix) on any problem."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not Path(cache_dir).is_dir():
        raise CacheError(f"{cache_dir}: no such cache directory; build one with `cache_tools build-cache`")
    if not path.is_file():
        raise CacheError(f"{path}: missing; this is not a finished cache (rerun `cache_tools build-cache --resume`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: unreadable manifest ({err}); rebuild the cache with --overwrite") from err
    return CacheManifest.from_dict(data, str(path))
