"""Review findings on the cache side, each pinned by a test: logit post-processing (Granite's logits_scaling),
repairing a finished cache with --resume, shards without a manifest, OS errors as one line, batch size in settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_testing import assert_same_cache, cache_arrays

from cache_tools.builder import BuildOptions, build_cache
from cache_tools.cli import main
from cache_tools.format import schema
from cache_tools.format.errors import BuildError


def _opts(teacher, text_file, out, **kw) -> BuildOptions:
    base = dict(teacher=str(teacher), dataset=str(text_file), output=str(out), max_length=32, top_k=8, shard_size=4,
                batch_size=2, max_samples=6, progress=False)
    base.update(kw)
    return BuildOptions(**base)


def test_granite_logits_scaling_is_applied(tmp_path, tokenizer, text_file):
    from transformers import AutoModelForCausalLM, GraniteConfig

    from examples.tiny_models import save_random_model

    cfg = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, logits_scaling=8.0, max_position_embeddings=64)
    teacher = save_random_model(cfg, tmp_path / "granite", tokenizer, seed=0)
    out = tmp_path / "cache"
    build_cache(_opts(teacher, text_file, out, max_samples=2))
    arrays = cache_arrays(out)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    n = int(arrays[schema.VALID_LENGTH][0])
    ids = torch.from_numpy(arrays[schema.INPUT_IDS][0, :n].astype(np.int64))[None]
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    expected, _ = reference.topk(8, dim=-1)
    got = torch.from_numpy(arrays[schema.TOPK_LOGPROBS][0, :n].astype(np.float32))
    assert torch.allclose(got, expected, atol=2e-2), float((got - expected).abs().max())


def test_resume_repairs_a_deleted_shard_of_a_complete_cache(tmp_path, teacher_dir, text_file):
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    build_cache(_opts(teacher_dir, text_file, clean))
    build_cache(_opts(teacher_dir, text_file, damaged))
    (damaged / schema.shard_name(1)).unlink()
    stats = build_cache(_opts(teacher_dir, text_file, damaged, resume=True))
    assert not stats.get("skipped")
    assert_same_cache(clean, damaged)


def test_shards_without_manifest_are_refused_without_resume(tmp_path, teacher_dir, text_file):
    """Without --resume the folder is refused, and the advice leads somewhere: --resume rebuilds the manifest (the
    fault suite checks that the recovered cache equals a clean build)."""
    out = tmp_path / "c"
    build_cache(_opts(teacher_dir, text_file, out))
    (out / schema.MANIFEST_NAME).unlink()
    with pytest.raises(BuildError, match="manifest.json is missing.*pass --resume"):
        build_cache(_opts(teacher_dir, text_file, out))
    build_cache(_opts(teacher_dir, text_file, out, resume=True))
    assert schema.load_manifest(out).complete


def test_resume_with_other_batch_size_is_refused(tmp_path, teacher_dir, text_file):
    out = tmp_path / "c"
    build_cache(_opts(teacher_dir, text_file, out))
    with pytest.raises(BuildError, match="other settings.*batch_size"):
        build_cache(_opts(teacher_dir, text_file, out, batch_size=3, resume=True))


def test_os_error_is_one_line(tmp_path, teacher_dir, text_file, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["build-cache", "--teacher", str(teacher_dir), "--dataset", str(text_file), "--output",
                 str(blocker / "sub"), "--max-samples", "2", "--max-length", "32", "--top-k", "8", "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert code == 2
    assert err[-1].startswith("cache_tools build-cache: error: ") and "Traceback" not in "\n".join(err)
