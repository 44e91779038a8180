"""The DistillKit comparison's own parts (DistillKit itself is not installed in CI): it skips with the reason when
its source is not given, its exact-KD reference agrees with the project's loss where they must agree, DistillKit's
decoded values become our top-k + tail, and the ablation merges runs split by variant."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench import __main__ as runner
from bench import ablation
from bench import bench_distillkit as dk


def test_skips_with_the_reason_without_distillkit(monkeypatch, tmp_path):
    monkeypatch.delenv(dk.ENV_VAR, raising=False)
    result = runner.run_one("distillkit", quick=True, device="cpu")
    assert result["status"] == "skipped" and dk.ENV_VAR in result["notes"][0]
    monkeypatch.setenv(dk.ENV_VAR, str(tmp_path))
    result = runner.run_one("distillkit", quick=True, device="cpu")
    assert result["status"] == "skipped" and str(tmp_path) in result["notes"][0]


def test_ablation_refuses_a_distillkit_variant_without_it(monkeypatch):
    monkeypatch.delenv(dk.ENV_VAR, raising=False)
    assert ablation.distillkit_codec("kd_k64_tail", 2048) is None
    with pytest.raises(SystemExit, match=dk.ENV_VAR):
        ablation.distillkit_codec("kd_distillkit_budget", 2048)


def test_exact_reference_equals_our_loss_on_a_complete_support():
    """Top-k holding (almost) all the mass: the bucket KL IS the full KL, so the fused loss on those targets must
    give the reference's value and gradient (checks the reference, the identity-head trick and the id alignment)."""
    from bench.codec_teachers import topk_targets

    rng = np.random.default_rng(0)
    logits = np.full((6, 300), -40.0)
    logits[:, :20] = rng.normal(0, 2, (6, 20))
    logp = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    ids, lp, tail = topk_targets(logp, 20)
    got = dk.quality(logp, {"complete": ("topk", {"ids": ids, "lp": lp, "tail": tail})}, rng)["complete"]
    for entry in got.values():
        assert entry["rel_err"] == pytest.approx(0.0, abs=1e-4) and entry["cos"] > 0.99999
        assert entry["norm_ratio"] == pytest.approx(1.0, abs=1e-4)
    short = dict(zip(("ids", "lp", "tail"), topk_targets(logp, 3), strict=True))  # most mass left in the tail
    worse = dk.quality(logp, {"top3": ("topk", short)}, rng)["top3"]["sigma=0.5"]
    assert worse["cos"] < 0.999 and worse["rel_err"] < -0.01  # the bucket KL drops the tail's inner KL


def test_implied_tail_is_the_mass_the_decoded_values_leave():
    ids = torch.tensor([[5, 1, 9], [2, 3, 4]])
    lp = torch.tensor([[0.5, 0.2, 0.1], [0.7, 0.3, 0.2]]).log().to(torch.bfloat16)
    out_ids, out_lp, tail = dk.implied_tail(ids, lp)
    assert out_ids.dtype == torch.int64 and out_lp.dtype == torch.float32 and tail.dtype == torch.float32
    assert float(tail[0]) == pytest.approx(math.log(1 - float(out_lp[0].exp().sum())), rel=1e-5)
    assert math.isfinite(float(tail[1])) and float(tail[1]) < math.log(1e-6)  # overshoot: a near-empty tail


def test_merge_runs_split_by_variant(tmp_path):
    def write(name, seeds, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"args": {"seeds": str(seeds)}, "rows": [
            {"variant": v, "losses": losses, "bytes_per_token": size} for v, losses, size in rows]}))
        return path

    a = write("a.json", [0, 1], [("teacher", [3.0], None), ("lm_only", [5.0, 6.0], None), ("kd_x", [4.0, 5.0], 9.0)])
    b = write("b.json", [0, 1], [("teacher", [3.0], None), ("kd_y", [4.5, 5.4], 2.0)])
    assert ablation.main(["--merge", str(a), str(b), "--out", str(tmp_path / "all.json")]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "all.json").read_text())["rows"]}
    assert rows["kd_y"]["losses"] == [4.5, 5.4] and rows["kd_y"]["bytes_per_token"] == 2.0
    assert rows["kd_y"]["vs_lm_only"] == pytest.approx(((4.5 - 5) / 5 + (5.4 - 6) / 6) / 2)
    assert rows["teacher"]["losses"] == [3.0]
