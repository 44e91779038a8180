"""`load_documents` over every local format and `pack_windows` packing invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache_tools.format.errors import DatasetInputError
from cache_tools.format.text_data import load_documents, pack_windows

DOCS = ["The first document.", "", "Second one, a little longer than the first.", "Third: short."]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("formats")
    (root / "d.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    (root / "d.jsonl").write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    table = datasets.Dataset.from_dict({"text": DOCS})
    table.to_csv(str(root / "d.csv"), index=False)
    table.to_parquet(str(root / "d.parquet"))
    table.save_to_disk(str(root / "saved"))
    folder = root / "folder"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[i * 2 :][:2]))
    return root


@pytest.mark.parametrize("name", ["d.txt", "d.csv", "d.parquet", "saved", "folder"])
def test_every_local_format(data_dir, name):
    docs = list(load_documents(str(data_dir / name)))
    assert [text for _, text in docs] == DOCS
    assert [index for index, _ in docs] == list(range(len(DOCS)))


def test_column_max_samples_streaming(data_dir):
    docs = list(load_documents(str(data_dir / "d.jsonl"), text_column="body", max_samples=3, streaming=True))
    assert [text for _, text in docs] == DOCS[:3]
    with pytest.raises(DatasetInputError, match=r"--text-column 'text': not in dataset .*body"):
        next(load_documents(str(data_dir / "d.jsonl")))
    with pytest.raises(DatasetInputError, match=r"--dataset .*missing.txt: no such file"):
        next(load_documents(str(data_dir / "missing.txt")))


def test_split_names_a_local_file(data_dir):
    assert len(list(load_documents(str(data_dir / "d.txt"), split="validation"))) == len(DOCS)


@pytest.mark.parametrize("max_length", [1, 7, 64])
def test_pack_windows_never_truncates(tokenizer, corpus, max_length):
    documents = [(i, text) for i, text in enumerate(corpus[:6])]
    documents.insert(2, (99, ""))  # empty documents vanish without leaving a separator behind
    windows = list(pack_windows(tokenizer, documents, max_length))
    eos = tokenizer.eos_token_id
    expected: list[int] = []
    for position, (_, text) in enumerate(d for d in documents if d[1]):
        if position:
            expected.append(eos)
        expected.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    stream = np.concatenate([w.input_ids for w in windows]).tolist()
    assert stream == expected
    assert all(len(w.input_ids) == max_length for w in windows[:-1])
    assert 1 <= len(windows[-1].input_ids) <= max_length
    doc_indices = [w.doc_index for w in windows]
    assert doc_indices == sorted(doc_indices) and doc_indices[0] == 0 and doc_indices[-1] == 5


def test_pack_windows_offsets_index_into_window_text(tokenizer, corpus):
    documents = list(enumerate(corpus[:3]))
    for window in pack_windows(tokenizer, documents, 50):
        assert window.offsets.shape == (len(window.input_ids), 2) and window.offsets.dtype == np.int32
        for token, (start, end) in zip(window.input_ids.tolist(), window.offsets.tolist(), strict=True):
            piece = window.text[start:end]
            if token == tokenizer.eos_token_id:
                assert piece == tokenizer.eos_token
            elif piece.isascii():
                assert tokenizer.decode([token]) == piece
