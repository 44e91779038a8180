"""Multi-process and DeepSpeed runs on CPU (gloo, DS_ACCELERATOR=cpu), as users launch them: 2 ranks x batch 2 must
reproduce the plain 1-process run at batch 4 (losses and final weights, fp32): DDP under `torchrun`, DeepSpeed
ZeRO-2 under `torchrun --deepspeed`, ZeRO-3 under `accelerate launch` with the shipped recipe (which also gathers
the partitioned weights into a loadable student). `distill.training.distributed` makes accelerate count the
DeepSpeed ranks on a machine without CUDA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cache_fixtures import write_synthetic_cache

from distill.training.checkpoints import MARKER, checkpoint_fault

REPO = Path(__file__).resolve().parent.parent
STEPS = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache"), tokenizer, corpus, num_sequences=24, shard_size=8)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, student_dir, cache_dir):
    """One process, global batch 4."""
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-m", "distill.train"], _train_args(student_dir, cache_dir, out, batch=4))
    from safetensors.torch import load_file

    initial = {f"student.{k}": v for k, v in load_file(student_dir / "model.safetensors").items()}
    return {"history": _history(out), "weights": _weights(out), "initial": initial}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(student_dir, cache_dir, out, *, batch: int) -> list[str]:
    return ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(STEPS),
            "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3", "--report_to", "none",
            "--disable_tqdm", "true", "--feature_weight", "0.5"]
    # No contrastive loss here: in-batch InfoNCE depends on the per-rank batch by definition (2 ranks x 2 != 1 x 4).


def _run(launcher: list[str], args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])


def _history(out: Path) -> dict[int, dict]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "loss" in h}


def _assert_same_losses(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for key in ("loss", "loss/ce", "loss/kd", "loss/feature", "top1_agreement", "teacher_mass_covered"):
        assert [a[s][key] for s in a] == pytest.approx([b[s][key] for s in a], rel=rel, abs=1e-6), key


def test_torchrun_two_ranks_match_one_rank(tmp_path, student_dir, cache_dir, baseline):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "distill.train"]
    _run(launcher, [*_train_args(student_dir, cache_dir, out, batch=2), "--ddp_backend", "gloo", "--use_cpu"])
    _assert_same_losses(_history(out), baseline["history"])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """Every exported tensor: the student's and the projection heads'."""
    from safetensors.torch import load_file

    tensors = {f"student.{k}": v for k, v in load_file(out / "student" / "model.safetensors").items()}
    # Tied embeddings (tiny Llama, like SmolLM): some exports store the head again, some do not; compare it once.
    tied = tensors.pop("student.lm_head.weight", None)
    assert tied is None or torch.equal(tied, tensors["student.model.embed_tokens.weight"])
    tensors.update({f"heads.{k}": v for k, v in load_file(out / "projection_heads.safetensors").items()})
    return tensors


def _assert_same_run(out: Path, baseline: dict, label: str) -> None:
    """Same losses (abs 1e-4) and the same final weights (max abs diff <= 1e-4) as the 1-rank run; prints both
    maxima (`pytest -s` shows them)."""
    history = _history(out)
    _assert_same_losses(history, baseline["history"])
    keys = ("loss", "loss/ce", "loss/kd", "loss/feature")
    loss_diff = max(abs(history[s][k] - baseline["history"][s][k]) for s in history for k in keys)
    mine, ref = _weights(out), baseline["weights"]
    assert sorted(mine) == sorted(ref), "exported tensors differ"  # full tensors, not ZeRO-3 shards
    assert all(mine[k].shape == ref[k].shape and mine[k].dtype == torch.float32 for k in ref)
    weight_diff = max(float((mine[k] - ref[k]).abs().max()) for k in ref)
    moved = max(float((ref[k] - baseline["initial"][k]).abs().max()) for k in baseline["initial"])
    print(f"{label}: max |loss diff| {loss_diff:.3g}, max |weight diff| {weight_diff:.3g} (training moved weights "
          f"by up to {moved:.3g})")
    assert loss_diff <= 1e-4 and weight_diff <= 1e-4
    # The checkpoint is marked complete only after both ranks wrote their shards (resume trusts the marker).
    marker = json.loads((out / f"checkpoint-{STEPS}" / MARKER).read_text())
    assert checkpoint_fault(out / f"checkpoint-{STEPS}") is None and "trainer_state.json" in marker["files"]
    assert moved > 100 * max(weight_diff, 1e-6)  # the comparison is meaningful: the weights did change


def test_torchrun_deepspeed_zero2_two_ranks_match_one_rank(tmp_path, student_dir, cache_dir, baseline):
    """`torchrun --nproc_per_node 2 -m distill.train ... --deepspeed ds_configs/zero2_fp16.json` on CPU (gloo):
    fp16 "auto" resolves to off without --fp16, so this is fp32 ZeRO-2 with gradients and optimizer states sharded
    over 2 ranks; 2 x batch 2 must equal 1 x batch 4."""
    out = tmp_path / "zero2"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "distill.train"]
    _run(launcher, [*_train_args(student_dir, cache_dir, out, batch=2), "--deepspeed",
                    str(REPO / "ds_configs" / "zero2_fp16.json")])
    _assert_same_run(out, baseline, "ZeRO-2, torchrun, 2 ranks x 2")


def test_accelerate_deepspeed_zero3_two_ranks_match_one_rank(tmp_path, student_dir, cache_dir, baseline):
    """The shipped ZeRO-3 recipe (launch/accelerate/zero3.yaml: 2 processes, zero.Init) under `accelerate launch`
    on CPU: parameters sharded over 2 ranks; the export gathers them into a full, loadable student."""
    from transformers import AutoModelForCausalLM

    config = yaml.safe_load((REPO / "launch" / "accelerate" / "zero3.yaml").read_text())
    assert config["num_processes"] == 2 and config["distributed_type"] == "DEEPSPEED"
    ds_config = str(REPO / "ds_configs" / "zero3_fp16.json")
    config["deepspeed_config"]["deepspeed_config_file"] = ds_config  # absolute: the test runs from any directory
    config_file = tmp_path / "zero3.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "zero3"
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch", "--config_file", str(config_file), "--main_process_port",
                str(_free_port()), "-m", "distill.train"]
    _run(launcher, [*_train_args(student_dir, cache_dir, out, batch=2), "--deepspeed", ds_config])
    _assert_same_run(out, baseline, "ZeRO-3, accelerate launch, 2 ranks x 2")
    AutoModelForCausalLM.from_pretrained(out / "student")
