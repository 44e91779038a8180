"""End to end: a cache built by the real builder with a real-shaped tiny teacher (151,936 head rows over a smaller
tokenizer), re-targeted for a student with another tokenizer and a 49,152-row head; same-tokenizer identity; bad
input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from xtok_fixtures import trained_tokenizer, write_text_cache

from cache_tools.format.errors import TokenizerError
from cache_tools.format.reader import TeacherCacheReader
from distill.data.dataset import CacheDataset, DirectTargets, DistillCollator
from distill.data.xtok.pipeline import CrossTokenizerTargets, aggregate_stats
from distill.losses import fused_ce_kd_loss

TEACHER_HEAD_ROWS = 151_936
STUDENT_HEAD_ROWS = 49_152


@pytest.fixture(scope="module")
def student_tok(corpus):
    return trained_tokenizer(corpus, 400, split_digits=True)


@pytest.fixture(scope="module")
def real_shape_cache(tmp_path_factory, tokenizer, corpus):
    """Built by `cache_tools.builder` from a Qwen3-MoE teacher with hidden 16 and Qwen's padded head size."""
    from cache_tools.builder import BuildOptions, build_cache
    from examples.tiny_models import save_random_model, tiny_qwen3_moe_config

    root = tmp_path_factory.mktemp("xtok_real_shape")
    cfg = tiny_qwen3_moe_config(TEACHER_HEAD_ROWS, hidden_size=16, layers=1)
    teacher = save_random_model(cfg, root / "teacher", tokenizer)
    data = root / "docs.txt"
    data.write_text("\n".join(d.replace("\n", " ") for d in corpus[:12]) + "\n", encoding="utf-8")
    build_cache(BuildOptions(teacher=str(teacher), dataset=str(data), output=str(root / "cache"), max_length=48,
                             top_k=16, batch_size=4, shard_size=8, max_samples=12, device="cpu", progress=False))
    return root / "cache"


def test_real_shapes_cross_tokenizer_batch_trains(real_shape_cache, tokenizer, student_tok):
    from examples.tiny_models import tiny_llama_config

    reader = TeacherCacheReader(real_shape_cache)
    builder = CrossTokenizerTargets(reader, None, student_tok)  # teacher tokenizer found through the manifest
    assert builder.vocab_map.ids.shape[0] == len(tokenizer) < TEACHER_HEAD_ROWS
    dataset = CacheDataset(reader, np.arange(len(reader)), builder)
    examples = [dataset[i] for i in range(len(dataset))]
    totals = aggregate_stats([e["stats"] for e in examples])
    assert totals["skipped"] == 0 and 0.6 < totals["aligned_fraction"] <= 1.0
    assert 0.5 < totals["mapped_mass_fraction"] <= 1.0 + 1e-9
    for e in examples:
        ids = e["topk_ids"][e["kd_mask"]]
        assert ids.max() < len(student_tok) and (ids[:, 0] >= 0).all()
        assert (e["topk_ids"][~e["kd_mask"]] == -1).all()
        assert np.isfinite(e["tail_logprob"]).all()
    batch = DistillCollator(student_tok.pad_token_id)(examples[:4])
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config(STUDENT_HEAD_ROWS, hidden_size=16, layers=1))
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    flat = batch["attention_mask"].reshape(-1).bool()
    out = fused_ce_kd_loss(hidden.reshape(-1, 16)[flat], model.lm_head.weight, batch["labels"].reshape(-1)[flat],
                           batch["topk_ids"].reshape(-1, 16)[flat].clamp(min=0), batch["topk_logprobs"].reshape(
                               -1, 16)[flat], batch["tail_logprob"].reshape(-1)[flat],
                           batch["kd_mask"].reshape(-1)[flat])
    assert torch.isfinite(out.loss) and out.n_kd == int(batch["kd_mask"].sum()) > 0
    out.loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_same_tokenizer_gives_exactly_the_direct_targets(tmp_path, tokenizer, corpus):
    from cache_tools.format.text_data import pack_windows

    # Windows that hold whole documents (EOS-separated), so re-tokenising a window's text is the teacher's own split.
    docs = [corpus[i][:300] for i in range(0, 40, 4)]
    windows = [w for i in range(0, len(docs), 2) for w in pack_windows(tokenizer, enumerate(docs[i:i + 2]), 400)]
    reader = TeacherCacheReader(write_text_cache(tmp_path, tokenizer, docs, max_length=400, windows=windows))
    cross = CrossTokenizerTargets(reader, tokenizer, tokenizer)
    direct = DirectTargets()
    for i in range(len(reader)):
        seq = reader[i]
        got, want = cross(seq), direct(seq)
        assert set(want) <= set(got)
        for key, value in want.items():
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert got["stats"]["aligned"] == seq.length


def test_text_that_decodes_differently_is_a_counted_logged_skip(tmp_path, tokenizer, student_tok, corpus, caplog):
    reader = TeacherCacheReader(write_text_cache(tmp_path, tokenizer, corpus[:6], max_length=64, max_sequences=3))
    builder = CrossTokenizerTargets(reader, tokenizer, student_tok, max_length=0)  # 0: the whole window
    seq = reader[1]
    seq.text = seq.text.replace("e", "E")  # same length, offsets still "valid", content wrong
    with caplog.at_level(logging.WARNING, logger="distill.data.xtok.pipeline"):
        out = builder(seq)
    assert out["stats"]["skipped"] == 1 and not out["kd_mask"].any()
    assert "do not reproduce the cached text" in caplog.text
    assert student_tok.decode(out["input_ids"].tolist()) == seq.text  # CE still trains on the real window text
    assert builder(reader[0])["stats"]["skipped"] == 0


def test_bad_tokenizers_fail_with_one_line_errors(tmp_path, tokenizer, student_tok, corpus):
    from transformers import ByT5Tokenizer

    reader = TeacherCacheReader(write_text_cache(tmp_path, tokenizer, corpus[:4], max_length=32, max_sequences=2))
    with pytest.raises(TokenizerError, match="slow .*offset mapping"):
        CrossTokenizerTargets(reader, tokenizer, ByT5Tokenizer())
    with pytest.raises(TokenizerError, match="not the one the cache was built with"):
        CrossTokenizerTargets(reader, student_tok, student_tok)
    with pytest.raises(TokenizerError, match="has no EOS") as err:
        CrossTokenizerTargets(reader, tokenizer, _tokenizer_without_specials(corpus[:50]))
    assert "\n" not in str(err.value)


def test_teacher_special_missing_from_student_goes_to_tail(tmp_path, corpus, student_tok, caplog):
    teacher = trained_tokenizer(corpus, 500, extra_special=("<|im_start|>",))
    docs = ["<|im_start|>user says hi", "plain text"]
    reader = TeacherCacheReader(write_text_cache(tmp_path, teacher, docs, max_length=64))
    with caplog.at_level(logging.WARNING, logger="distill.data.xtok.pipeline"):
        builder = CrossTokenizerTargets(reader, teacher, student_tok)
    assert "<|im_start|>" in caplog.text
    im_start = teacher.convert_tokens_to_ids("<|im_start|>")
    assert builder.vocab_map.ids[im_start] == -1
    out = builder(reader[0])
    assert student_tok.decode(out["input_ids"].tolist()).startswith("<|im_start|>user")
    assert out["stats"]["skipped"] == 0 and out["kd_mask"].sum() > 3


def _tokenizer_without_specials(texts: list[str]):
    """A byte-level BPE with no special tokens at all (no EOS, nothing with the teacher's EOS content)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                       .alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)
