"""Under DeepSpeed (ZeRO-2 on CPU, one process) a step with a non-finite loss is skipped like everywhere else, in
fp32 and bf16 alike: the weights after the poisoned step equal those before it, and later steps still train. The
skip is DeepSpeed's overflow check, which the trainer forces on even when a config turns it off (bf16
`check_grad_overflow`, ZeRO `compute_grad_norm`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cache_fixtures import write_synthetic_cache

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# Runs inside `accelerate launch`: poison the 2nd forward (step 2), record the final-norm weight after every step.
SCRIPT = """
import json, sys, torch
from transformers import TrainerCallback
from distill.train import build_trainer
from distill.training.config import parse_config, validate

cfg = parse_config(sys.argv[2:])
validate(cfg)
built = build_trainer(cfg)
calls, snaps = {"n": 0}, {}

def hook(module, args, output):
    calls["n"] += 1
    return output * float("nan") if calls["n"] == 2 else output

class Snap(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        model = built.trainer.accelerator.unwrap_model(built.trainer.model_wrapped)
        snaps[state.global_step] = torch.cat([p.detach().double().flatten() for p in model.parameters()])

built.model.student.model.norm.register_forward_hook(hook)
built.trainer.add_callback(Snap())
built.trainer.train()
out = {"skipped": built.trainer.nonfinite_total,
       "same_1_2": bool(torch.equal(snaps[1], snaps[2])), "moved_2_3": not bool(torch.equal(snaps[2], snaps[3])),
       "finite": bool(torch.isfinite(snaps[3]).all())}
open(sys.argv[1], "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache"), tokenizer, corpus, num_sequences=16, shard_size=8)


# A config that turns DeepSpeed's own checks off: the trainer must turn them back on (else the NaN step is applied).
HOSTILE = {"bf16": {"enabled": "auto", "check_grad_overflow": False}, "gradient_clipping": 0,
           "zero_optimization": {"stage": 2, "compute_grad_norm": False}}


@pytest.mark.parametrize("precision, hostile", [("fp32", False), ("bf16", True), ("fp32", True)])
def test_nonfinite_step_is_skipped_under_deepspeed(tmp_path, student_dir, cache_dir, precision, hostile):
    config = yaml.safe_load((REPO / "launch" / "accelerate" / "multi_gpu_zero2.yaml").read_text())
    ds_file = REPO / "ds_configs" / "zero2_bf16.json"  # bf16 "auto": on with --bf16, off (fp32) without
    if hostile:
        shipped = json.loads(ds_file.read_text())
        ds_file = tmp_path / "hostile.json"
        ds_file.write_text(json.dumps({**shipped, **HOSTILE}))
    config.update(num_processes=1)
    config["deepspeed_config"]["deepspeed_config_file"] = str(ds_file)
    accel_cfg = tmp_path / "accelerate.yaml"
    accel_cfg.write_text(yaml.safe_dump(config))
    script, result = tmp_path / "run.py", tmp_path / "result.json"
    script.write_text(SCRIPT)
    argv = ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
            "--disable_tqdm", "true", "--save_strategy", "no", "--deepspeed", str(ds_file),
            *(["--bf16", "true", "--use_cpu"] if precision == "bf16" else []),
            *(["--max_grad_norm", "0"] if hostile else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(accel_cfg), str(script), str(result),
                           *argv], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = json.loads(result.read_text())
    assert outcome == {"skipped": 1, "same_1_2": True, "moved_2_3": True, "finite": True}, outcome
