"""The benchmark runner and the online-KD baseline: `python -m bench --quick` runs end to end and records ratios with
their context (CI smoke test: nothing is asserted about speed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import __main__ as runner
from bench.common import ratio
from bench.online_kd import full_logit_kd_loss, next_token_labels


def test_ratio_goal_direction():
    assert ratio(1.0, 2.0, "<= 1.05")["met"] is True
    assert ratio(3.0, 2.0, "<= 1.05")["met"] is False
    assert ratio(0.95, 1.0, ">= 0.90")["met"] is True
    assert ratio(0.5, 1.0, ">= 0.90")["met"] is False
    assert ratio(1.0, 4.0)["met"] is None and ratio(1.0, 4.0)["value"] == 0.25


def test_full_logit_kd_zero_for_identical_and_matches_kl_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen)
    labels = next_token_labels(torch.randint(0, 11, (2, 5), generator=gen))
    _, _, kd_same = full_logit_kd_loss(logits, logits.clone(), labels)
    assert float(kd_same) == pytest.approx(0.0, abs=1e-6)
    # Teacher with padded head rows (like Qwen's): the extra rows must be dropped, not mixed in.
    teacher = torch.cat([torch.randn(2, 5, 11, generator=gen), torch.full((2, 5, 3), 50.0)], dim=-1)
    _, ce, kd = full_logit_kd_loss(logits, teacher, labels, temperature=2.0)
    valid = (labels != -100).flatten()
    p = torch.softmax(teacher[..., :11].flatten(0, 1)[valid] / 2.0, -1)
    q = torch.softmax(logits.flatten(0, 1)[valid] / 2.0, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean() * 4.0
    assert float(kd) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(ce) == pytest.approx(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1)[valid],
                                                                             labels.flatten()[valid])), rel=1e-6)
    assert labels[:, -1].eq(-100).all()


def test_missing_benchmark_is_skipped_not_fatal():
    result = runner.run_one("does_not_exist", quick=True, device="cpu")
    assert result["status"] == "skipped" and "not there" in result["notes"][0]


def test_quick_run_writes_results_with_ratios_and_context(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "results.json"
    code = runner.main(["--quick", "--only", "step", "storage", "--out", str(out)])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert code == 0, record
    assert record["quick"] is True and record["device"]["device"] == "cpu"
    assert record["versions"]["torch"] == torch.__version__
    step = record["benchmarks"]["step"]
    assert step["status"] == "ok" and step["dtype"] == "fp32"
    for name in ("cached_kd/lm_only", "online_kd/cached_kd", "(online/cached)/ideal"):
        assert math.isfinite(step["ratios"][name]["value"]) and step["ratios"][name]["value"] > 0
    # The online step runs a teacher forward on top of the student's work, so it cannot be cheaper than cached KD
    # by a wide margin; its ideal is > 1 by construction.
    assert step["ratios"]["ideal online/cached"]["value"] > 1.0
    storage = record["benchmarks"]["storage"]
    assert storage["status"] == "ok"
    sizes = storage["sizes"]
    # The compact encoding must beat today's fp16 layout at the same k, and sampled N=16 must beat both.
    fp16, compact, sampled = (sizes[n]["bytes_per_token"] for n in ("topk fp16 k=32", "topk compact k=32",
                                                                    "sampled compact N=16"))
    assert sampled < compact < fp16
    assert sizes["topk fp16 k=32"]["tokens"] == sizes["topk compact k=32"]["tokens"] > 0
    assert "cached_kd/lm_only" in printed and "topk compact k=32 / topk fp16 k=32" in printed
