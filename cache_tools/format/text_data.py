"""Text input shared by the cache builder and the trainer's LM-only path: `load_documents` turns a dataset spec into
`(doc_index, text)` pairs, `pack_windows` (from `packing`) tokenises them and cuts the EOS-joined token stream into
fixed windows. `open_dataset` is shared with the conversational input (`chat_data`)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cache_tools.format.errors import DatasetInputError, one_line
from cache_tools.format.manifest import RowsInfo
from cache_tools.format.packing import Window, pack_windows  # noqa: F401 - re-exported: text input packs with these

# File extension -> `datasets` packaged builder.
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a folder of data files of one kind."""
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetInputError(f"--dataset {path}: unsupported file type {path.suffix!r}; use one of "
                                    f"{sorted(_BUILDERS)}")
        return builder, [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if not files:
        raise DatasetInputError(f"--dataset {path}: folder holds no {'/'.join(sorted(_BUILDERS))} files; point at a "
                                "data file")
    if len(builders) > 1:
        raise DatasetInputError(f"--dataset {path}: folder mixes file types {sorted(builders)}; keep one kind per "
                                "folder")
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


def open_dataset(spec: str, split: str, streaming: bool) -> Any:
    import datasets

    path = Path(spec).expanduser()
    try:
        if _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetInputError(f"--dataset {spec}: no split {split!r} (has {sorted(ds)}); pass --split")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        if path.exists():
            builder, files = _local_files(path)
            if files and all(os.path.getsize(f) == 0 for f in files):
                what = "the file has" if len(files) == 1 else "every file has"
                raise DatasetInputError(f"--dataset {spec}: empty ({what} 0 bytes); pass a file with text")
            # Local files have one split; name it after --split so any split name the user passes selects it.
            return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
        looks_like_file = Path(spec).suffix.lower() in (".txt", ".jsonl", ".json", ".parquet", ".csv", ".arrow")
        if looks_like_file or (os.sep in spec and (spec.startswith((".", "/", "~")) or spec.count("/") > 1)):
            raise DatasetInputError(f"--dataset {spec}: no such file or folder; check the path")
        name, _, config = spec.partition(":")
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except DatasetInputError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise describe_load_error(spec, path, err) from err


def row_count(spec: str, split: str, streaming: bool, max_samples: int | None) -> int | None:
    """How many rows a build will read (for a progress total), or None when unknown (streaming, or a dataset
    without a length). Opening a local dataset a second time reads the datasets library's cache."""
    if streaming:
        return None
    try:
        total = len(open_dataset(spec, split, streaming=False))
    except TypeError:
        return None
    return total if max_samples is None else min(total, max_samples)


def _root_cause(err: BaseException) -> BaseException:
    """The innermost cause: `datasets` wraps the real problem in "An error occurred while generating the dataset"."""
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    return err


def _first_bad_line(files: list[str], builder: str) -> str | None:
    """'FILE: line N ...; fix' for the first line that is not UTF-8 (JSON lines: not a JSON object); run only after
    a load failed, to name the place."""
    for file in files:
        with open(file, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    return (f"{file}: line {number} is not valid UTF-8 (byte {raw[err.start]:#04x} at column "
                            f"{err.start + 1}); re-encode it as UTF-8 (iconv -f latin1 -t utf-8) or fix that line")
                if builder == "json" and file.endswith(".jsonl") and line.strip():
                    try:
                        if not isinstance(json.loads(line), dict):
                            raise ValueError("not a JSON object")
                    except ValueError as err:
                        return f"{file}: line {number} is not a JSON object ({one_line(err)}); fix or remove that line"
    return None


def describe_load_error(spec: str, path: Path, err: BaseException) -> DatasetInputError:
    cause = _root_cause(err)
    if path.exists() and not _is_saved_dataset(path):
        builder, files = _local_files(path)
        where = _first_bad_line(files, builder)
        if where:
            return DatasetInputError(f"--dataset {where}")
        return DatasetInputError(f"--dataset {spec}: cannot read ({one_line(cause)}); check the files are valid "
                                 f"{builder} (one kind per folder)")
    return DatasetInputError(f"--dataset {spec}: cannot load ({one_line(cause)}); pass a local file/folder or a hub "
                             "name[:config]")


def dataset_rows(ds: Any, spec: str, max_samples: int | None) -> Iterator[tuple[int, Any]]:
    """(row index, row) of an opened dataset, at most `max_samples` rows. Streaming datasets fail while iterating,
    not at load: such an error becomes the same one line as at load."""
    records = iter(ds)
    index = 0
    while max_samples is None or index < max_samples:
        try:
            row = next(records)
        except StopIteration:
            return
        except DatasetInputError:
            raise
        except Exception as err:
            raise describe_load_error(spec, Path(spec).expanduser(), err) from err
        yield index, row
        index += 1


def load_documents(
    spec: str,
    *,
    split: str = "train",
    text_column: str = "text",
    max_samples: int | None = None,
    streaming: bool = False,
    rows: RowsInfo | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield `(doc_index, text)` for each row of the dataset `spec` (local .txt/.jsonl/.json/.parquet/.csv file or
    folder, a `save_to_disk` folder, or hub `name[:config]`). `doc_index` is the row number. Errors
    (DatasetInputError, one line naming the spec and the fix) are raised on the first `next()`, before any document
    is yielded. Rows without text are skipped (one warning with the count at the end); `rows`, when given, receives
    the counts once the dataset is exhausted."""
    ds = open_dataset(spec, split, streaming)
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_column not in columns:
        raise DatasetInputError(f"--text-column {text_column!r}: not in dataset {spec} (columns: {columns}); pass the "
                                "right --text-column")
    missing, first_missing, read = 0, -1, 0
    for index, row in dataset_rows(ds, spec, max_samples):
        if text_column not in row and columns is not None:
            raise DatasetInputError(f"--text-column {text_column!r}: not in dataset {spec} (columns: {sorted(row)})")
        # A streamed JSON row lists only its own fields: one without the text field is a row without text.
        text = row.get(text_column)
        if text is None:  # JSON rows without the field read as null too: counted and reported, not silently dropped
            missing += 1
            first_missing = index if first_missing < 0 else first_missing
            text = ""
        elif not isinstance(text, str):
            raise DatasetInputError(f"--dataset {spec}: row {index + 1}: column {text_column!r} holds "
                                    f"{type(text).__name__}, not text; pass the right --text-column")
        yield index, text  # NUL and every other character pass through unchanged (the shard stores text losslessly)
        read = index + 1
    if columns is None and read and missing == read:  # streamed: no row at all has the field
        raise DatasetInputError(f"--text-column {text_column!r}: no row of dataset {spec} has it (missing or null); "
                                "pass the right --text-column")
    place = row_place(spec, first_missing) if missing else ""
    if rows is not None:
        rows.read, rows.without_text, rows.first_without_text = read, missing, place
    if missing:
        warn(f"--dataset {spec}: {missing} of {read} rows have no {text_column!r} (field missing or null; first at "
             f"{place}); they were skipped")


def warn(message: str) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def row_place(spec: str, row: int) -> str:
    """'line N of FILE' for a single JSON-lines file (blank lines are not rows), else 'row N'."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with open(path, "rb") as f:
            rows = -1
            for number, raw in enumerate(f, start=1):
                rows += bool(raw.strip())
                if rows == row:
                    return f"line {number} of {path}"
    return f"row {row + 1}"
