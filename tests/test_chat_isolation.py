"""Isolated packing: the teacher's targets for a conversation packed with others equal the teacher run on that
conversation alone (fp32, max abs log-prob difference <= 1e-4), with eager and SDPA attention, on the real Qwen3
tokenizer and chat template and a tiny random Qwen3 whose head has Qwen3's 151,936 rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_tools import teacher
from cache_tools.format import chat_data, packing
from tests.chat_fixtures import QWEN3, make_conversations, tiny_qwen3_config, write_jsonl

pytestmark = pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
TOP_K = 8


@pytest.fixture(scope="module")
def qwen3_teacher(tmp_path_factory, corpus):
    from transformers import AutoTokenizer

    from examples.tiny_models import save_random_model

    tok = AutoTokenizer.from_pretrained(QWEN3)
    path = save_random_model(tiny_qwen3_config(), tmp_path_factory.mktemp("qwen3_teacher"), tok, seed=3)
    loaded = teacher.load_teacher(str(path), None, trust_remote_code=False, dtype="fp32", device=torch.device("cpu"))
    rows = make_conversations(corpus, 6, seed=5, max_turns=2)
    data = write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", rows)
    return loaded, data


def _pieces(loaded, data) -> list[packing.Piece]:
    stats = chat_data.ChatStats()
    template = chat_data.chat_template(loaded.tokenizer, None)
    return list(chat_data.conversation_pieces(loaded.tokenizer, str(data), split="train", row_format="messages",
                                              template=template, kwargs={}, max_samples=None, streaming=False,
                                              stats=stats))


def _run(loaded, windows: list[packing.Window], segments: bool) -> dict[str, np.ndarray]:
    T = max(len(w.input_ids) for w in windows)
    ids = torch.zeros((len(windows), T), dtype=torch.int64)
    mask = torch.zeros((len(windows), T), dtype=torch.int64)
    for row, w in enumerate(windows):
        ids[row, : len(w.input_ids)] = torch.from_numpy(w.input_ids)
        mask[row, : len(w.input_ids)] = 1
    out = teacher.teacher_batch(loaded, ids, mask, [-1], TOP_K,
                                segments=[w.segment_lengths for w in windows] if segments else None)
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_targets_equal_each_conversation_alone(qwen3_teacher, attention):
    loaded, data = qwen3_teacher
    loaded.model.set_attn_implementation(attention)
    pieces = _pieces(loaded, data)
    windows = list(packing.pack_conversations(pieces, 700))
    assert any(len(w.segment_lengths) >= 2 for w in windows)  # something is packed
    packed = _run(loaded, windows, segments=True)
    cross = _run(loaded, windows, segments=False)
    by_row = {p.doc_index: p for p in pieces}
    worst, compared, leaked = 0.0, 0, 0.0
    for row, w in enumerate(windows):
        start = 0
        for record, length in zip(w.conversation, w.segment_lengths, strict=True):
            piece = by_row[record["row"]]
            if len(piece.ids) != length:  # a piece of a conversation longer than the window: no "alone" run
                start += length
                continue
            alone = _run(loaded, [packing.Window(np.asarray(piece.ids, dtype=np.int64), np.zeros((0, 2)), "", 0,
                                                 np.array([len(piece.ids)], dtype=np.int32))], segments=False)
            assert np.array_equal(w.input_ids[start : start + length], piece.ids)
            got = packed["topk_logprobs"][row, start : start + length]
            want = alone["topk_logprobs"][0, :length]
            worst = max(worst, float(np.abs(got - want).max()))
            if start:
                leaked = max(leaked, float(np.abs(cross["topk_logprobs"][row, start : start + length] - want).max()))
            compared += 1
            start += length
    assert compared >= 3
    assert worst <= 1e-4, f"{attention}: packed vs alone differ by {worst}"
    assert leaked > 1e-3, "the check cannot fail: cross-document packing gave the same targets"
