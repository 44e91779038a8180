"""Isolated packing on the student side: a window packing several documents trains and evaluates exactly as each
document run alone (per-document positions + a block-diagonal causal mask), through the real collator and model, in
eager and SDPA attention; the student follows the cache's recorded packing and refuses a contradicting flag."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cache_tools.format.errors import ConfigError
from distill.data.dataset import DirectTargets, DistillCollator, TokenWindowDataset
from distill.data.packing import cache_packing, eos_segments, positions_and_segments, resolve_packing
from distill.losses import IGNORE_INDEX, KDConfig
from distill.training.attention import block_causal_mask
from distill.training.modeling import DistillModel

K = 4


def _seq(ids: np.ndarray, rng: np.random.Generator, vocab: int, segments: list[int] | None = None):
    """A CachedSequence-like window with random (valid) top-k targets."""
    n = ids.shape[0]
    logits = rng.normal(size=(n, K)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True) * 1.25)
    top = np.stack([rng.choice(vocab, K, replace=False) for _ in range(n)])
    return SimpleNamespace(index=0, input_ids=ids.astype(np.int64), offsets=np.zeros((n, 2), np.int32),
                           topk_ids=top.astype(np.int64), topk_logprobs=logp,
                           tail_logprob=np.full(n, np.log(0.2), np.float32),
                           pooled_hidden=np.zeros((1, 4), np.float16), text="", doc_index=0,
                           segment_lengths=None if segments is None else np.asarray(segments, np.int32),
                           assistant_mask=None, target_mask=None, length=n)


def _cut(seq, start: int, stop: int):
    return dataclasses.replace(seq, input_ids=seq.input_ids[start:stop]) if dataclasses.is_dataclass(seq) else \
        SimpleNamespace(**{**vars(seq), "input_ids": seq.input_ids[start:stop], "offsets": seq.offsets[start:stop],
                           "topk_ids": seq.topk_ids[start:stop], "topk_logprobs": seq.topk_logprobs[start:stop],
                           "tail_logprob": seq.tail_logprob[start:stop], "segment_lengths": None,
                           "length": stop - start})


def _student(impl: str, vocab: int):
    from transformers import AutoModelForCausalLM

    from examples.tiny_models import tiny_llama_config

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab)
    cfg._attn_implementation = impl
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def _sums(model: DistillModel, batch: dict) -> tuple[float, float, int, int]:
    """(summed CE, summed KD, CE rows, KD rows) of one batch."""
    with torch.no_grad():
        out = model(**batch, loss_weights={"ce": 1.0, "kd": 1.0})
    n_ce, n_kd = int(out["n_ce"]), int(out["n_kd"])
    return float(out["ce"]) * n_ce, float(out["kd"]) * n_kd, n_ce, n_kd


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_window_equals_each_document_alone(impl):
    """Two packed windows (3 and 2 documents, padded in one batch) give the same per-document hidden states and the
    same CE / KD sums as every document run as its own window; cross-document attention does not."""
    vocab, rng = 64, np.random.default_rng(0)
    docs = [[9, 4, 7, 5, 2, 11], [3, 8, 1], [6, 6, 2, 10], [12, 5, 9, 3, 3, 7, 1], [4, 2]]
    windows = [(docs[0] + docs[1] + docs[2], [6, 3, 4]), (docs[3] + docs[4], [7, 2])]
    seqs = [_seq(np.array(ids), rng, vocab, segs) for ids, segs in windows]
    model = DistillModel(_student(impl, vocab), KDConfig())
    collate = DistillCollator(pad_token_id=0)
    isolated = DirectTargets(isolated=True)
    packed = collate([isolated(s) for s in seqs])
    assert packed["segment_ids"][1].tolist()[7:11] == [1, 1, -1, -1]  # the shorter window is padded
    alone = []
    for seq, (_, segs) in zip(seqs, windows, strict=True):
        for start, stop in zip(np.cumsum([0, *segs[:-1]]), np.cumsum(segs), strict=True):
            alone.append(_cut(seq, int(start), int(stop)))
    single = [collate([DirectTargets()(s)]) for s in alone]

    with torch.no_grad():
        hidden, _ = model.encode(packed["input_ids"], packed["attention_mask"], packed["position_ids"],
                                 packed["segment_ids"])
        k = 0
        for b, (_, segs) in enumerate(windows):
            start = 0
            for length in segs:
                own, _ = model.encode(single[k]["input_ids"], single[k]["attention_mask"])
                torch.testing.assert_close(hidden[b, start:start + length], own[0], rtol=0, atol=2e-5)
                start += length
                k += 1
    ce, kd, n_ce, n_kd = _sums(model, packed)
    parts = [_sums(model, batch) for batch in single]
    assert n_ce == sum(p[2] for p in parts) and n_kd == sum(p[3] for p in parts)
    assert ce == pytest.approx(sum(p[0] for p in parts), rel=1e-5)
    assert kd == pytest.approx(sum(p[1] for p in parts), rel=1e-5)
    crossed = collate([DirectTargets()(s) for s in seqs])
    ce_cross = _sums(model, crossed)[0]
    assert abs(ce_cross - ce) > 1e-3  # the test can fail: attending across documents changes the loss


def test_collator_positions_segments_and_labels():
    batch = DistillCollator(pad_token_id=0)([
        {"input_ids": np.array([5, 6, 7, 8, 9]), "segment_lengths": np.array([2, 3], np.int32)},
        {"input_ids": np.array([1, 2, 3])},
    ])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, -1, -1]]
    # position 1 would predict the next document's first token: no label
    assert batch["labels"][0].tolist() == [6, IGNORE_INDEX, 8, 9, IGNORE_INDEX]
    with pytest.raises(ValueError, match="do not tile"):
        positions_and_segments(np.array([2, 2]), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mask_is_fp16_safe_on_padding_rows(dtype):
    mask = block_causal_mask(torch.tensor([[0, 0, 1, -1, -1]]), dtype)
    assert mask.dtype == dtype and mask.shape == (1, 1, 5, 5)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert torch.isfinite(mask).all() and float(mask.min()) == torch.finfo(dtype).min
    scores = torch.randn(1, 1, 5, 5, dtype=dtype) * 30 + mask
    assert torch.isfinite(torch.softmax(scores.float(), -1)).all()


def test_lm_only_isolated_windows_cut_after_each_eos():
    assert eos_segments(np.array([4, 5, 0, 6, 0, 7]), 0).tolist() == [3, 2, 1]
    assert eos_segments(np.array([4, 5, 0]), 0).tolist() == [3]
    ds = TokenWindowDataset([np.array([4, 5, 0, 6, 7])], isolate_after=0)
    assert ds[0]["segment_lengths"].tolist() == [3, 2]
    assert "segment_lengths" not in TokenWindowDataset([np.array([4, 5])])[0]


def test_student_follows_the_cache_and_refuses_a_contradicting_flag():
    old = SimpleNamespace(dataset=SimpleNamespace())  # format 1/2: no record
    iso = SimpleNamespace(dataset=SimpleNamespace(packing="isolated"))
    assert cache_packing(old) == "cross_document" and cache_packing(iso) == "isolated"
    assert resolve_packing(None, [("c", iso)]) == "isolated"
    assert resolve_packing("isolated", [("c", iso)]) == "isolated"
    with pytest.raises(ConfigError, match="--packing cross_document: the cache c was built with isolated"):
        resolve_packing("cross_document", [("c", iso)])
    with pytest.raises(ConfigError, match="packed differently"):
        resolve_packing(None, [("train", iso), ("eval", old)])


def test_lm_only_training_with_isolated_packing(tmp_path, student_dir, tokenizer_dir, text_file):
    """`--dataset file.txt --packing isolated`: the trainer's batches carry per-document positions, and a step runs."""
    from distill.train import build_trainer
    from distill.training.config import parse_config, validate

    argv = ["--student_config", str(student_dir / "config.json"), "--tokenizer", str(tokenizer_dir),
            "--dataset", str(text_file), "--max_length", "64", "--kd_weight", "0", "--packing", "isolated",
            "--output_dir", str(tmp_path / "lm"), "--use_cpu", "--max_steps", "2", "--report_to", "none",
            "--save_strategy", "no", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]
    cfg = parse_config(argv)
    validate(cfg)
    built = build_trainer(cfg)
    batch = next(iter(built.trainer.get_train_dataloader()))
    assert int(batch["segment_ids"].max()) >= 1  # 64-token windows of short docstrings pack several documents
    assert (batch["position_ids"][batch["segment_ids"] == 1][0] == 0).all()
    built.trainer.train()
    with pytest.raises(ConfigError, match="--packing sideways"):
        validate(parse_config([a if a != "isolated" else "sideways" for a in argv]))


def test_cross_tokenizer_student_tokenises_each_document_alone(tmp_path, tokenizer, corpus):
    """Another student tokenizer: its window splits at the teacher's document starts, each piece is the student's
    tokenisation of that document alone, and the store gives back the same pieces."""
    from xtok_fixtures import trained_tokenizer, write_text_cache

    from cache_tools.format.reader import TeacherCacheReader
    from distill.data.xtok.pipeline import CrossTokenizerTargets

    student = trained_tokenizer(corpus, 400, split_digits=True)
    texts = [d[:120].replace("\n", " ") for d in corpus[:10]]
    cache = write_text_cache(tmp_path / "cache", tokenizer, texts, max_length=96)
    reader = TeacherCacheReader(cache)
    builder = CrossTokenizerTargets(reader, None, student, isolated=True, use_store=False, max_length=0)
    seen_multi = False
    for i in range(len(reader)):
        raw = reader[i]
        seq = SimpleNamespace(**{**vars(raw), "segment_lengths": eos_segments(raw.input_ids, tokenizer.eos_token_id),
                                 "assistant_mask": None, "target_mask": None})
        seq.length = raw.length
        out = builder(seq)
        pieces = out["segment_lengths"]
        assert int(pieces.sum()) == out["input_ids"].shape[0]
        seen_multi |= pieces.shape[0] > 1
        t_starts = np.concatenate([[0], np.cumsum(seq.segment_lengths)[:-1]])
        s_start = 0
        for k, length in enumerate(pieces.tolist()):
            a = int(seq.offsets[t_starts[k], 0])
            b = int(seq.offsets[t_starts[k + 1], 0]) if k + 1 < len(t_starts) else len(seq.text)
            doc = seq.text[a:b].replace(tokenizer.eos_token, "")
            alone = student(doc, add_special_tokens=False)["input_ids"]
            got = out["input_ids"][s_start:s_start + length].tolist()
            assert [t for t in got if t != student.eos_token_id] == alone
            s_start += length
    assert seen_multi
