"""The console of a run whose output goes to a pipe or file (a launcher, a log): no progress-bar redraws that would
land inside the per-step records, one clean record per log step, and the closing summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cache_fixtures import write_synthetic_cache

REPO = Path(__file__).resolve().parent.parent


def test_records_and_bar_do_not_share_a_line(tmp_path, student_dir, tokenizer, corpus):
    cache = write_synthetic_cache(tmp_path / "cache", tokenizer, corpus, num_sequences=16, shard_size=8)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill.train", "--student", str(student_dir), "--cache", str(cache), "--output_dir",
         str(out), "--use_cpu", "--per_device_train_batch_size", "2", "--max_steps", "6", "--logging_steps", "1",
         "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # What a terminal shows: each physical line is the text after its last carriage return.
    shown = [line.rsplit("\r", 1)[-1] for line in proc.stdout.split("\n")]
    records = [line for line in proc.stdout.split("\n") if re.search(r"step \d+ \| ", line)]
    assert len(records) >= 6, proc.stdout[-3000:]
    for record in records:
        visible = record.rsplit("\r", 1)[-1]
        assert visible.startswith("step ") and "it/s" not in visible and "%|" not in visible, repr(record)
    assert "/6 [" not in proc.stdout  # the training bar stays off the pipe
    assert any(line.startswith("done: 6 steps") for line in shown)
    assert any(line.startswith(f"student: {out}/student") for line in shown)
