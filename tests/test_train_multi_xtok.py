"""Several teachers' caches built by `build-cache` (real windows digests) and a student with another tokenizer: each
cache goes through its own cross-tokenizer path, and its precomputed store gives the same run bit for bit."""

from __future__ import annotations

import pytest
import torch

from cache_tools.builder import BuildOptions, build_cache
from cache_tools.format import schema
from cache_tools.format.windows import check_same_windows
from distill.train import build_trainer
from distill.training.config import parse_config, validate


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory, teacher_dir, text_file):
    root = tmp_path_factory.mktemp("multi_xtok")
    common = dict(teacher=str(teacher_dir), dataset=str(text_file), max_length=64, batch_size=4, shard_size=8,
                  max_samples=12, progress=False)
    build_cache(BuildOptions(output=str(root / "topk"), top_k=16, **common))
    build_cache(BuildOptions(output=str(root / "sampled"), targets="sampled", samples=16, **common))
    return root / "topk", root / "sampled"


def test_the_builder_records_equal_digests_for_the_same_windows(two_caches):
    manifests = [schema.load_manifest(c) for c in two_caches]
    assert manifests[0].format_version == 3
    digests = [[s.windows_digest for s in m.shards] for m in manifests]
    assert digests[0] == digests[1] and all(digests[0])
    check_same_windows(list(zip(two_caches, manifests, strict=True)))


def _run(tmp_path, name, student, caches):
    flags = [x for c in caches for x in ("--cache", str(c))]
    argv = ["--student", str(student), *flags, "--output_dir", str(tmp_path / name), "--use_cpu",
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-3"]
    cfg = parse_config(argv)
    validate(cfg)
    built = build_trainer(cfg)
    built.trainer.train()
    logs = [h for h in built.trainer.state.log_history if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in built.model.student.state_dict().items()}


def test_student_with_another_tokenizer_trains_from_both_caches_and_their_stores(tmp_path, two_caches,
                                                                                 other_student):
    from distill.prepare_xtok import main as prepare

    fly_logs, fly_weights = _run(tmp_path, "fly", other_student, two_caches)
    assert all(h["teacher0/kd"] > 0 and h["teacher1/kd"] > 0 for h in fly_logs)
    assert all(0.3 < h["xtok/aligned_fraction"] <= 1.0 for h in fly_logs)
    for cache in two_caches:
        assert prepare([str(cache), "--student-tokenizer", str(other_student), "--workers", "1"]) == 0
        assert any((cache / "xtok").iterdir())
    store_logs, store_weights = _run(tmp_path, "store", other_student, two_caches)
    keys = ("loss", "teacher0/kd", "teacher1/kd")
    assert [[h[k] for k in keys] for h in store_logs] == [[h[k] for k in keys] for h in fly_logs]
    assert all(torch.equal(fly_weights[k], store_weights[k]) for k in fly_weights)
