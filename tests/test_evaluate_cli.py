"""`python -m distill.evaluate` end to end through its command line: a run trained on its own tokenizer's cache
(direct path), a run whose student has another tokenizer (cross-tokenizer path, on the fly and from the store that
`python -m distill.prepare_xtok` precomputes), the table and `--json` outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cache_fixtures import write_synthetic_cache

from distill import evaluate
from distill.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--use_cpu", "--per_device_train_batch_size", "2", "--max_steps", "1", "--report_to", "none",
               "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-3"]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "distill.evaluate", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True)


def test_direct_run_table_and_json(tmp_path, student_dir, tokenizer, corpus):
    cache = write_synthetic_cache(tmp_path / "cache", tokenizer, corpus, num_sequences=8, shard_size=4)
    out = tmp_path / "run"
    assert train_main(["--student", str(student_dir), "--cache", str(cache), "--eval_cache", str(cache),
                       "--output_dir", str(out), *TRAIN_FLAGS]) == 0
    table = _cli("--student", str(out))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == f"{out / 'student'} on {cache}:"
    assert any(ln.split()[0] == "perplexity" for ln in lines[1:]) and "KD kind" in table.stdout
    assert "aligned" not in table.stdout  # no cross-tokenizer rows on the direct path
    as_json = json.loads(_cli("--student", str(out), "--json").stdout)
    assert as_json["sequences"] == 8 and "xtok_aligned_fraction" not in as_json
    perplexity = next(ln for ln in lines if ln.split()[0] == "perplexity").split()[-1]
    assert float(perplexity) == pytest.approx(as_json["perplexity"], rel=1e-3)


def test_cross_tokenizer_run_on_the_fly_and_from_the_store(tmp_path, small_topk_cache, other_student, capsys):
    from distill.prepare_xtok import main as prepare_main

    out = tmp_path / "run"
    assert train_main(["--student", str(other_student), "--cache", str(small_topk_cache), "--eval_cache",
                       str(small_topk_cache), "--output_dir", str(out), *TRAIN_FLAGS]) == 0
    capsys.readouterr()
    on_the_fly = _cli("--student", str(out), "--json")
    assert on_the_fly.returncode == 0, on_the_fly.stderr  # was: forward() got an unexpected keyword 'xtok_stats'
    assert "computed on the fly" in on_the_fly.stderr and "prepare_xtok" in on_the_fly.stderr
    metrics = json.loads(on_the_fly.stdout)
    assert metrics["sequences"] == 48 and 0.3 < metrics["xtok_aligned_fraction"] <= 1.0
    assert 0.3 < metrics["xtok_mapped_mass_fraction"] <= 1.0 + 1e-6 and metrics["kd"] > 0

    assert prepare_main([str(small_topk_cache), "--student-tokenizer", str(other_student), "--workers", "1"]) == 0
    stored = _cli("--student", str(out), "--json")
    assert stored.returncode == 0, stored.stderr
    assert "on the fly" not in stored.stderr
    from_store = json.loads(stored.stdout)
    for key in ("ce", "kd", "top1_agreement", "xtok_aligned_fraction", "xtok_mapped_mass_fraction"):
        assert from_store[key] == pytest.approx(metrics[key], rel=1e-5), key

    assert evaluate.main(["--student", str(out / "student"), "--cache", str(small_topk_cache)]) == 0  # exported folder
    table = capsys.readouterr().out
    assert "student tokens aligned to teacher positions" in table and "teacher mass mapped" in table
