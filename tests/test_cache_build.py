"""The builder's numbers against an independent computation, and in-process resume/overwrite behaviour."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from cache_testing import assert_same_cache, cache_arrays, save_boosted_teacher

from cache_tools.builder import BuildOptions, build_cache
from cache_tools.format import schema
from cache_tools.format.errors import BuildError
from cache_tools.format.reader import TeacherCacheReader

MAX_LENGTH, TOP_K, SHARD_SIZE = 48, 16, 8


@pytest.fixture(scope="module")
def boosted_teacher(tmp_path_factory, teacher_dir, tokenizer):
    return save_boosted_teacher(teacher_dir, tmp_path_factory.mktemp("boosted"), len(tokenizer))


def _options(teacher, dataset, output, **overrides) -> BuildOptions:
    settings = dict(teacher=str(teacher), dataset=str(dataset), output=str(output), max_length=MAX_LENGTH,
                    top_k=TOP_K, shard_size=SHARD_SIZE, batch_size=3, pool_layers=[-1, 1], max_samples=25,
                    progress=False)
    settings.update(overrides)
    return BuildOptions(**settings)


@pytest.fixture(scope="module")
def built(tmp_path_factory, boosted_teacher, text_file):
    out = tmp_path_factory.mktemp("cache") / "c"
    stats = build_cache(_options(boosted_teacher, text_file, out))
    return out, stats


@pytest.fixture(scope="module")
def reference_model(boosted_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(boosted_teacher, dtype=torch.float32).eval()


def test_summary_matches_shards(built):
    out, stats = built
    manifest = schema.load_manifest(out)
    assert manifest.complete
    assert stats["num_sequences"] == manifest.num_sequences == sum(s.num_sequences for s in manifest.shards)
    assert manifest.num_sequences > 2 * SHARD_SIZE  # several shards, the last one partial or full
    assert [s.first_sequence for s in manifest.shards] == [i * SHARD_SIZE for i in range(len(manifest.shards))]
    arrays = cache_arrays(out)
    assert manifest.num_tokens == int(arrays[schema.VALID_LENGTH].sum())
    # Every window is full except possibly the very last one: packing never truncates or pads in the middle.
    assert (arrays[schema.VALID_LENGTH][:-1] == MAX_LENGTH).all()
    assert manifest.pooling.layers == [2, 1]  # -1 resolved against 2 layers (+ embeddings)


def test_topk_and_tail_equal_independent_log_softmax(built, reference_model, tokenizer):
    out, _ = built
    vocab = len(tokenizer)
    reader = TeacherCacheReader(out)
    padded_top1 = 0
    for index in (0, 5, len(reader) - 1):
        seq = reader[index]
        with torch.no_grad():
            logits = reference_model(torch.from_numpy(seq.input_ids)[None]).logits[0].float()  # [n, rows]
        padded_top1 += int((logits.argmax(-1) >= vocab).sum())
        logprobs = torch.log_softmax(logits[:, :vocab], dim=-1)
        ref_vals, _ = logprobs.topk(TOP_K, dim=-1)
        cached_ids = torch.from_numpy(seq.topk_ids)
        cached_lp = torch.from_numpy(seq.topk_logprobs.astype(np.float32))
        assert (cached_ids < vocab).all() and (cached_ids >= 0).all()
        # The listed ids carry the reference log-probs, and they are the K largest (ties may order differently).
        torch.testing.assert_close(logprobs.gather(1, cached_ids), cached_lp, atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(ref_vals, cached_lp, atol=2e-2, rtol=1e-3)
        rest = logprobs.scatter(1, cached_ids, float("-inf"))
        exact_tail = torch.logsumexp(rest, dim=-1).clamp_min(schema.TAIL_LOGPROB_FLOOR)
        torch.testing.assert_close(torch.from_numpy(seq.tail_logprob), exact_tail, atol=1e-4, rtol=1e-4)
        total = cached_lp.double().exp().sum(-1) + torch.from_numpy(seq.tail_logprob).double().exp()
        assert (total - 1).abs().max() < 1e-2
    # The padded rows really are dangerous in this teacher (so "never a candidate" is a real check).
    assert padded_top1 > 0


def test_pooled_hidden_is_masked_mean_of_each_layer(built, reference_model):
    out, _ = built
    reader = TeacherCacheReader(out)
    last = len(reader) - 1  # the shortest window: padded in its batch, so the mask matters
    for index in (1, last):
        seq = reader[index]
        with torch.no_grad():
            states = reference_model(torch.from_numpy(seq.input_ids)[None], output_hidden_states=True).hidden_states
        expected = torch.stack([states[layer][0].float().mean(0) for layer in (2, 1)])
        torch.testing.assert_close(torch.from_numpy(seq.pooled_hidden.astype(np.float32)), expected,
                                   atol=2e-3, rtol=2e-3)


def test_windows_reproduce_teacher_tokenisation(built, tokenizer):
    out, _ = built
    reader = TeacherCacheReader(out)
    seq = reader[0]
    pieces = [seq.text[s:e] for s, e in seq.offsets]
    assert "".join(pieces) == seq.text  # ASCII docstrings: offsets tile the window's text exactly
    assert tokenizer(seq.text, add_special_tokens=False)["input_ids"][:10] == seq.input_ids[:10].tolist()


def _break_build(out) -> None:
    """Simulate a kill: manifest back to complete=false, a finished shard without sidecar, a missing shard, and a
    leftover temp file."""
    manifest = schema.load_manifest(out)
    manifest.complete, manifest.shards = False, []
    manifest.save(out)
    (out / schema.shard_sidecar_name(0)).unlink()
    (out / schema.shard_name(2)).unlink()
    (out / schema.shard_sidecar_name(2)).unlink()
    (out / (schema.shard_name(3) + schema.TMP_SUFFIX)).write_bytes(b"partial garbage")


def test_resume_keeps_finished_shards_and_equals_clean_build(built, boosted_teacher, text_file, tmp_path, capsys):
    out, _ = built
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    _break_build(copy)
    kept_mtime = (copy / schema.shard_name(1)).stat().st_mtime_ns
    capsys.readouterr()
    stats = build_cache(_options(boosted_teacher, text_file, copy, resume=True))
    assert stats["kept_shards"] >= 2
    kept = int(stats["kept_shards"])  # the closing line says what the resumed build kept
    closing = capsys.readouterr().err
    assert f"({kept} kept from the interrupted build, {stats['num_shards'] - kept} built now)" in closing
    assert (copy / schema.shard_name(1)).stat().st_mtime_ns == kept_mtime  # kept, not rewritten
    assert not list(copy.glob("*" + schema.TMP_SUFFIX))
    assert json.loads((copy / schema.shard_sidecar_name(0)).read_text())["sha256"]
    assert_same_cache(out, copy)


def test_resume_of_complete_cache_is_a_no_op(built, boosted_teacher, text_file):
    out, _ = built
    before = (out / schema.MANIFEST_NAME).read_text()
    stats = build_cache(_options(boosted_teacher, text_file, out, resume=True))
    assert stats.get("skipped") and (out / schema.MANIFEST_NAME).read_text() == before


def test_other_settings_refused_then_overwritten(built, boosted_teacher, text_file, tmp_path):
    out, _ = built
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    before = sorted(p.name for p in copy.iterdir())
    for resume in (False, True):
        with pytest.raises(BuildError, match=r"--output .*other settings \(targets\.top_k\).*--overwrite"):
            build_cache(_options(boosted_teacher, text_file, copy, top_k=8, resume=resume))
    assert sorted(p.name for p in copy.iterdir()) == before
    with pytest.raises(BuildError, match="--resume"):  # same settings but neither flag: refuse too
        build_cache(_options(boosted_teacher, text_file, copy))
    build_cache(_options(boosted_teacher, text_file, copy, top_k=8, overwrite=True, max_samples=4))
    manifest = schema.load_manifest(copy)
    assert manifest.slots == 8 and manifest.complete
    assert len(list(copy.glob("shard-*.h5"))) == len(manifest.shards)  # stale shards of the old cache are gone
    with h5py.File(copy / manifest.shards[0].file, "r") as f:
        assert f[schema.TOPK_IDS].shape[-1] == 8


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_tail_exact_when_top_k_holds_almost_all_mass(scale):
    from cache_tools.teacher import topk_targets

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden = torch.randn(40, 16) * scale  # large scales: top-k mass ~ 1, where log(1 - sum p) would cancel to -inf
    ids, logprobs, tail = topk_targets(hidden, head, 900, 5)  # rows 900.. play the padded head rows
    with torch.no_grad():
        logits = head(hidden)[:, :900].double()
    total = logits.logsumexp(-1)
    exact = (logits.scatter(1, ids.clone(), float("-inf")).logsumexp(-1) - total).clamp_min(schema.TAIL_LOGPROB_FLOOR)
    torch.testing.assert_close(tail.double(), exact, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logprobs.double(), logits.gather(1, ids.clone()) - total[:, None], atol=1e-4, rtol=1e-5)
    assert (ids < 900).all()
    _, _, full_tail = topk_targets(hidden, head, 900, 900)  # k = vocabulary: empty tail, stored as the floor
    assert (full_tail == schema.TAIL_LOGPROB_FLOOR).all()


def test_progress_bar_counts_rows_with_a_total(built, boosted_teacher, text_file, tmp_path, capsys):
    """A dataset with a length gets a bar with a total (so tqdm shows an ETA) in rows, the tokens beside it; a resumed
    build's bar starts from the finished shards it keeps, and says so."""
    from cache_tools.format import text_data

    total = text_data.row_count(str(text_file), "train", False, 25)
    assert total is not None and 0 < total <= 25
    assert text_data.row_count(str(text_file), "train", True, 25) is None  # streaming: no length
    out, _ = built
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    _break_build(copy)
    capsys.readouterr()
    stats = build_cache(_options(boosted_teacher, text_file, copy, resume=True, progress=True))
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()
    bar = [line for line in final if "teacher cache" in line][-1]
    assert f"{total}/{total}" in bar and "row" in bar and "tokens" in bar
    assert f"kept {int(stats['kept_shards'])} finished shard(s)" in bar
