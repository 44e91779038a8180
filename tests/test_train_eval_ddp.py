"""Evaluation under DDP (torchrun, 2 CPU ranks, gloo) gives the 1-process numbers: the samples accelerate repeats to
give every rank an even last batch are not counted (5 held-out sequences over 2 ranks x 2 per batch: 3 repeats)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cache_fixtures import write_synthetic_cache

from distill.train import build_trainer
from distill.training.config import parse_config, validate

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SCRIPT = """
import json, os, sys
from distill.train import build_trainer
from distill.training.config import parse_config, validate

cfg = parse_config(sys.argv[2:])
validate(cfg)
metrics = build_trainer(cfg).trainer.evaluate()
if int(os.environ.get("RANK", "0")) == 0:
    open(sys.argv[1], "w").write(json.dumps(metrics))
# As distill.train does: a gloo group still alive at interpreter exit can abort the process ("terminate called
# without an active exception") after a successful run.
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tokenizer, corpus):
    root = tmp_path_factory.mktemp("ddp_eval")
    train = write_synthetic_cache(root / "train", tokenizer, corpus, num_sequences=8)
    held_out = write_synthetic_cache(root / "eval", tokenizer, corpus[200:], num_sequences=5)
    return train, held_out


def _argv(student_dir, caches, out) -> list[str]:
    return ["--student", str(student_dir), "--cache", str(caches[0]), "--eval_cache", str(caches[1]),
            "--output_dir", str(out), "--per_device_eval_batch_size", "2", "--report_to", "none",
            "--disable_tqdm", "true", "--use_cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_eval_excludes_even_batch_padding(tmp_path, student_dir, caches):
    cfg = parse_config(_argv(student_dir, caches, tmp_path / "single"))
    validate(cfg)
    single = build_trainer(cfg).trainer.evaluate()
    script, result = tmp_path / "eval.py", tmp_path / "ddp.json"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    proc = subprocess.run([*launcher, str(script), str(result), *_argv(student_dir, caches, tmp_path / "ddp"),
                           "--ddp_backend", "gloo"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads(result.read_text())
    for key in ("eval_ce", "eval_kd", "eval_loss", "eval_top1_agreement", "eval_teacher_mass_covered"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
