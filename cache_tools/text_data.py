"""Text input shared by the cache builder and the trainer's LM-only path: `load_documents` turns a dataset spec into
`(doc_index, text)` pairs, `pack_windows` tokenises them and cuts the EOS-joined token stream into fixed windows."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# File extension -> `datasets` packaged builder.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_TOKENIZE_GROUP = 64  # documents per batched tokenizer call (fast tokenizers parallelise inside a batch)


@dataclass
class Window:
    """One packed window of n <= max_length tokens; `offsets[i]` = (start, end) of token i in `text`."""

    input_ids: np.ndarray  # [n] int64
    offsets: np.ndarray  # [n, 2] int32
    text: str
    doc_index: int


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a folder of data files of one kind."""
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset {path}: unsupported file type {path.suffix!r}; use one of {sorted(_BUILDERS)}")
        return builder, [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if not files:
        raise ValueError(f"--dataset {path}: folder holds no {'/'.join(sorted(_BUILDERS))} files; point at a data file")
    if len(builders) > 1:
        raise ValueError(f"--dataset {path}: folder mixes file types {sorted(builders)}; keep one kind per folder")
    return builders.pop(), [str(p) for p in files]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def dataset_fingerprint(spec: str, *, split: str = "train") -> str:
    """Content fingerprint of a local dataset (sha256 over file names and bytes); hub specs are identified by name,
    split and config only (no network access to resolve a revision)."""
    path = Path(spec).expanduser()
    h = hashlib.sha256()
    if path.exists():
        root = path if path.is_dir() else path.parent
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(str(file.relative_to(root)).encode("utf-8") + b"\0")
            with open(file, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    else:
        h.update(f"hub:{spec}:{split}".encode())
    return h.hexdigest()


def _open_dataset(spec: str, split: str, streaming: bool) -> Any:
    import datasets

    path = Path(spec).expanduser()
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"--dataset {spec}: no split {split!r} (has {sorted(ds)}); pass --split")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        if path.exists():
            builder, files = _local_files(path)
            # Local files have one split; name it after --split so any split name the user passes selects it.
            return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
        if os.sep in spec and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise ValueError(f"--dataset {spec}: no such file or folder; check the path")
        name, _, config = spec.partition(":")
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except ValueError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fix = "pass a local file/folder or a hub name[:config]"
        raise ValueError(f"--dataset {spec}: cannot load ({first}); {fix}") from err


def load_documents(
    spec: str,
    *,
    split: str = "train",
    text_column: str = "text",
    max_samples: int | None = None,
    streaming: bool = False,
) -> Iterator[tuple[int, str]]:
    """Yield `(doc_index, text)` for each row of the dataset `spec` (local .txt/.jsonl/.json/.parquet/.csv file or
    folder, a `save_to_disk` folder, or hub `name[:config]`). `doc_index` is the row number. Errors (ValueError, one
    line naming the spec and the fix) are raised on the first `next()`, before any document is yielded."""
    ds = _open_dataset(spec, split, streaming)
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_column not in columns:
        raise ValueError(f"--text-column {text_column!r}: not in dataset {spec} (columns: {columns}); pass the right "
                         "--text-column")
    for index, row in enumerate(ds):
        if max_samples is not None and index >= max_samples:
            break
        if text_column not in row:
            raise ValueError(f"--text-column {text_column!r}: not in dataset {spec} (columns: {sorted(row)})")
        text = row[text_column]
        yield index, "" if text is None else str(text)


def _eos(tokenizer: Any) -> tuple[int, str]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; pass a tokenizer "
                         "with eos_token set (--tokenizer)")
    return int(eos_id), str(tokenizer.eos_token)


def _tokenized(tokenizer: Any, documents: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str, list, list]]:
    """(doc_index, text, ids, offsets) per non-empty document, tokenising groups of documents per call."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer is not a fast (Rust) tokenizer; character offsets need one (save it with "
                         "`tokenizers` or pass a fast --tokenizer)")
    group: list[tuple[int, str]] = []

    def flush() -> Iterator[tuple[int, str, list, list]]:
        enc = tokenizer([t for _, t in group], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for (doc_index, text), ids, offs in zip(group, enc["input_ids"], enc["offset_mapping"], strict=True):
            if ids:
                yield doc_index, text, ids, offs
        group.clear()

    for doc_index, text in documents:
        if text:
            group.append((doc_index, text))
        if len(group) >= _TOKENIZE_GROUP:
            yield from flush()
    if group:
        yield from flush()


class _WindowBuilder:
    """Accumulates one window: token ids plus the pieces of text they cover, each piece one run of tokens of one
    document (or one EOS), so offsets are re-based onto the window's own text."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.offsets: list[tuple[int, int]] = []
        self.pieces: list[str] = []
        self.length_chars = 0
        self.doc_index = -1

    def add_run(self, doc_index: int, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        if self.doc_index < 0:
            self.doc_index = doc_index
        lo = min(start for start, _ in offsets)
        hi = max(end for _, end in offsets)
        base = self.length_chars - lo
        self.ids.extend(ids)
        self.offsets.extend((s + base, e + base) for s, e in offsets)
        self.pieces.append(text[lo:hi])
        self.length_chars += hi - lo

    def add_eos(self, doc_index: int, eos_id: int, eos_text: str) -> None:
        if self.doc_index < 0:
            self.doc_index = doc_index  # a window opening on a separator belongs to the document it closes
        self.ids.append(eos_id)
        self.offsets.append((self.length_chars, self.length_chars + len(eos_text)))
        self.pieces.append(eos_text)
        self.length_chars += len(eos_text)

    def window(self) -> Window:
        return Window(
            input_ids=np.asarray(self.ids, dtype=np.int64),
            offsets=np.asarray(self.offsets, dtype=np.int32).reshape(-1, 2),
            text="".join(self.pieces),
            doc_index=self.doc_index,
        )


def pack_windows(tokenizer: Any, documents: Iterable[tuple[int, str]], max_length: int) -> Iterator[Window]:
    """Concatenate the documents' tokens with EOS between documents and cut the stream into windows of exactly
    `max_length` tokens (the last may be shorter). A long document spans several windows; nothing is truncated."""
    if max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {max_length}")
    eos_id, eos_text = _eos(tokenizer)
    current = _WindowBuilder()
    previous_doc = -1
    for doc_index, text, ids, offsets in _tokenized(tokenizer, documents):
        if previous_doc >= 0:
            current.add_eos(previous_doc, eos_id, eos_text)
            if len(current.ids) == max_length:
                yield current.window()
                current = _WindowBuilder()
        previous_doc = doc_index
        pos = 0
        while pos < len(ids):
            take = min(max_length - len(current.ids), len(ids) - pos)
            current.add_run(doc_index, text, ids[pos : pos + take], offsets[pos : pos + take])
            pos += take
            if len(current.ids) == max_length:
                yield current.window()
                current = _WindowBuilder()
    if current.ids:
        yield current.window()
