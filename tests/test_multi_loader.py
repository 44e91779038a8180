"""Several caches in one loader: the second and later teachers read only their targets and masks (the windows are the
first cache's), and hand the collator exactly what reading their cache alone gives."""

from __future__ import annotations

import numpy as np
import pytest
from cache_fixtures import write_synthetic_cache

from cache_tools.cli import main as cache_main
from cache_tools.format import encodings, schema, shard_io
from cache_tools.format.errors import CacheError, CacheMismatchError
from distill.data.dataset import TEACHER_KEYS, build_cache_data, teacher_key
from distill.data.multi import build_multi_cache_data
from tests.chat_fixtures import make_conversations, write_jsonl

KINDS = {
    "topk_fp16": None,
    "topk_compact": schema.TargetsInfo(kind="topk", encoding="compact", top_k=8),
    "sampled_fp16": schema.TargetsInfo(kind="sampled", encoding="fp16", num_samples=16),
    "sampled_compact": schema.TargetsInfo(kind="sampled", encoding="compact", num_samples=16),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _spy_reads(monkeypatch) -> list[set[str]]:
    """Record which stored datasets each row read asks for."""
    seen: list[set[str]] = []
    real = shard_io.read_row

    def spy(f, m, row, specs=None, valid_length=None):
        out = real(f, m, row, specs, valid_length)
        seen.append(set(out))
        return out

    monkeypatch.setattr(shard_io, "read_row", spy)
    return seen


def _assert_same_teacher(multi, alone, t: int) -> None:
    for i in range(len(alone)):
        got, want = multi[i], alone[i]
        for key in TEACHER_KEYS:
            value = got[teacher_key(t, key)]
            assert value.dtype == want[key].dtype and np.array_equal(value, want[key]), (i, key)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_later_teachers_read_only_their_targets_and_equal_their_cache_alone(tmp_path, tokenizer, corpus, kind,
                                                                           monkeypatch):
    a = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=12, shard_size=5, seed=0)
    b = write_synthetic_cache(tmp_path / "b", tokenizer, corpus, num_sequences=12, shard_size=5, seed=1,
                              targets=KINDS[kind])
    multi = build_multi_cache_data([a, b], tokenizer, len(tokenizer), eval_fraction=0.3).train
    alone = build_cache_data(b, tokenizer, len(tokenizer), eval_fraction=0.3).train
    seen = _spy_reads(monkeypatch)
    _assert_same_teacher(multi, alone, 1)
    wanted = {spec.name for spec in encodings.target_datasets(schema.load_manifest(b))} | {schema.VALID_LENGTH}
    assert wanted.isdisjoint({schema.INPUT_IDS, schema.TEXT, schema.OFFSETS, schema.OFFSETS_BLOB,
                              schema.POOLED_HIDDEN, schema.DOC_INDEX, schema.SEGMENT_LENGTHS})
    # per window: teacher 0 whole, teacher 1 its targets only, then cache b alone, whole
    assert len(seen) == 3 * len(alone)
    assert seen[1::3] == [wanted] * len(alone)
    assert seen[0::3] == [set(schema.dataset_names(schema.load_manifest(a)))] * len(alone)
    assert seen[2::3] == [set(schema.dataset_names(schema.load_manifest(b)))] * len(alone)


def test_a_later_teachers_window_of_another_length_is_refused(tmp_path, tokenizer, corpus, monkeypatch):
    a = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=6, shard_size=6, seed=0)
    b = write_synthetic_cache(tmp_path / "b", tokenizer, corpus, num_sequences=6, shard_size=6, seed=1)
    multi = build_multi_cache_data([a, b], tokenizer, len(tokenizer)).train
    reader = multi.datasets[1].reader
    real = reader.read_targets

    def shorter(index):
        out = real(index)
        out.topk_ids, out.topk_logprobs, out.tail_logprob = out.topk_ids[:-1], out.topk_logprobs[:-1], \
            out.tail_logprob[:-1]
        out.target_mask = out.target_mask[:-1]
        return out

    monkeypatch.setattr(reader, "read_targets", shorter)
    with pytest.raises(CacheMismatchError, match=f"{a} and {b}: sequence 0 holds other tokens"):
        multi[0]


def test_a_damaged_later_teacher_is_still_refused(tmp_path, tokenizer, corpus):
    a = write_synthetic_cache(tmp_path / "a", tokenizer, corpus, num_sequences=6, shard_size=6, seed=0)
    b = write_synthetic_cache(tmp_path / "b", tokenizer, corpus, num_sequences=6, shard_size=6, seed=1,
                              nan_sequence=2)
    multi = build_multi_cache_data([a, b], tokenizer, len(tokenizer)).train
    multi[1]
    with pytest.raises(CacheError, match="shard-00000.h5: sequence 2 holds NaN/Inf or positive teacher log-probs"):
        multi[2]


@pytest.fixture(scope="module")
def chat_caches(tmp_path_factory, teacher_dir, corpus):
    """Two assistant-only conversational caches of one teacher (fp16 and compact) over the same windows."""
    root = tmp_path_factory.mktemp("multi_chat")
    template = root / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    data = write_jsonl(root / "chat.jsonl", make_conversations(corpus, 8, seed=3, reasoning=False, max_turns=2,
                                                               context=(3, 12)))
    out = []
    for name, extra in (("fp16", ()), ("compact", ("--encoding", "compact"))):
        argv = ["build-cache", "--teacher", str(teacher_dir), "--dataset", str(data), "--output", str(root / name),
                "--max-length", "128", "--top-k", "8", "--batch-size", "4", "--no-progress", "--chat-template",
                str(template), *extra]
        assert cache_main(argv) == 0
        out.append(root / name)
    return out


@pytest.mark.parametrize("assistant_only", [True, False])
def test_assistant_only_masks_of_a_later_teacher_equal_its_cache_alone(chat_caches, tokenizer, assistant_only):
    m = schema.load_manifest(chat_caches[1])
    assert m.targets.assistant_only and {schema.TARGET_MASK, schema.ASSISTANT_MASK} <= {
        spec.name for spec in encodings.target_datasets(m)}
    options = {"assistant_only_loss": assistant_only}
    multi = build_multi_cache_data(chat_caches, tokenizer, len(tokenizer), **options).train
    alone = build_cache_data(chat_caches[1], tokenizer, len(tokenizer), **options).train
    _assert_same_teacher(multi, alone, 1)
    masks = [alone[i]["kd_mask"] for i in range(len(alone))]
    assert any(not mask.all() for mask in masks) and any(mask.any() for mask in masks)  # masks genuinely applied
