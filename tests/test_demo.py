"""End-to-end: `python -m examples.demo --quick` runs teacher -> cache -> students through the real entry points (as a
subprocess, as a user would) and writes a report with the numbers and TensorBoard runs for all three models. The
quick setting checks the pipeline, not the KD margin (docs/RESULTS.md reports the default setting)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "DISTILL_DEMO_CACHE": str(tmp_path_factory.mktemp("demo_teachers"))}
    proc = subprocess.run([sys.executable, "-m", "examples.demo", "--quick", "--out", str(out)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)
    return out, proc


def test_demo_pipeline_runs_and_reports(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status_lines = [line for line in proc.stdout.splitlines() if line.startswith("[demo ")]
    assert [line.split("]")[0] for line in status_lines] == [f"[demo {i}/8" for i in range(1, 9)]
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    for name in ("teacher", "kd_student", "rs_student", "lm_student"):
        m = metrics[name]
        assert math.isfinite(m["val_loss"]) and m["val_loss"] > 0
        assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
        assert 0.0 <= m["top1_agreement"] <= 1.0
        assert report["info"]["tokens_per_s"][name] > 0
    assert metrics["teacher"]["top1_agreement"] == 1.0
    for name in ("teacher", "kd_student", "rs_student", "lm_student"):
        assert (out / name / "student" / "config.json").is_file()  # save_pretrained exports
    sizes = report["info"]["cache_bytes_per_token"]
    assert 0 < sizes["sampled_cache"] < sizes["cache"]  # N = 64 samples cost less than the top-256 cache
    # Same student config, steps and data for every student: the parameter counts must match.
    assert metrics["kd_student"]["params"] == metrics["rs_student"]["params"] == metrics["lm_student"]["params"]
    md = (out / "report.md").read_text()
    assert "| Student, distilled from the top-256 cache (" in md and "sampled N=64 cache" in md
    assert "B/token" in md
    for figure in ("loss_curves.png", "cache_bytes.png"):  # pictures beside the report, embedded in it
        assert f"]({figure})" in md and (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = re.findall(r"\| Student, LM-only[^|]*\| [\d,]+ \| (\d+\.\d+) \|", md)
    assert numbers and float(numbers[0]) == pytest.approx(metrics["lm_student"]["val_loss"], abs=1e-4)


def test_demo_writes_tensorboard_runs_side_by_side(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0
    for name in ("teacher", "kd_student", "rs_student", "lm_student"):
        events = list((out / "runs" / name).rglob("events.out.tfevents.*"))
        assert events, f"no TensorBoard event file under runs/{name}"


def test_demo_rejects_bad_text_file_with_one_line(tmp_path):
    bad = tmp_path / "tiny.txt"
    bad.write_text("only one line\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "examples.demo", "--quick", "--text-file", str(bad), "--out",
                           str(tmp_path / "o")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "--text-file" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written
