"""Every launch recipe runs as written: each command line of launch/recipes/*.sh is executed by bash on CPU, with
only the hub names (tiny local teacher/student/dataset), the device (a CPU copy of the accelerate config, no
fp16/bf16) and the sizes (samples, steps) swapped. The Kaggle recipe is one process with `deepspeed:` in its YAML
under an accelerate config without DeepSpeed: distill.train must give DeepSpeed its world of one itself."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "launch" / "recipes"
TEACHER, STUDENT, DATASET = "huihui-ai/Huihui-MoE-1B-A0.6B", "HuggingFaceTB/SmolLM-135M", \
    "Salesforce/wikitext:wikitext-103-raw-v1"
# Sizes only: a CPU run of minutes instead of GPU hours. Appended, so they override the recipe's own values.
BUILD_SIZE = "--max-samples 6 --batch-size 2 --shard-size 8 --max-length 64"
TRAIN_SIZE = ("--max_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --eval_steps 1 "
              "--save_steps 2 --logging_steps 1 --max_eval_sequences 4 --dataloader_num_workers 0 "
              "--early_stopping_warmup_steps 0 --report_to none")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def local_assets(tmp_path_factory, teacher_dir, corpus):
    """The hub names' stand-ins: the tiny teacher, a student with ANOTHER tokenizer (as SmolLM vs Qwen), and a
    dataset folder with train and validation splits."""
    import datasets

    from examples.tiny_models import save_random_model, tiny_llama_config, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("recipe_assets")
    tok = train_bpe_tokenizer(corpus[:200], 384, split_digits=True)
    student = save_random_model(tiny_llama_config(len(tok)), root / "student", tok, seed=3)
    data = root / "wikitext"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": corpus[:40]}),
                          "validation": datasets.Dataset.from_dict({"text": corpus[40:52]})}).save_to_disk(str(data))
    return {TEACHER: str(teacher_dir), STUDENT: str(student), DATASET: str(data)}


def _cpu_accelerate_config(name: str, tmp_path: Path) -> Path:
    """launch/accelerate/<name> for this machine: no mixed precision, no GPU ids; everything else as shipped
    (with no GPU, accelerate runs on the CPU; DeepSpeed too, with DS_ACCELERATOR=cpu)."""
    config = yaml.safe_load((REPO / "launch" / "accelerate" / name).read_text())
    if "mixed_precision" in config:  # a DeepSpeed config takes its precision from its JSON file instead
        config["mixed_precision"] = "no"
    config.pop("gpu_ids", None)
    ds = config.get("deepspeed_config", {})
    if "deepspeed_config_file" in ds:
        ds["deepspeed_config_file"] = str(REPO / ds["deepspeed_config_file"])
    path = tmp_path / f"cpu_{name}"
    path.write_text(yaml.safe_dump(config))
    return path


def _local_script(script: Path, assets: dict[str, str], tmp_path: Path) -> str:
    """The recipe with only hub names, device and sizes swapped."""
    text = re.sub(r"\\\n", " ", script.read_text(encoding="utf-8"))  # one line per command
    for hub, local in assets.items():
        text = text.replace(hub, local)
    for name in re.findall(r"launch/accelerate/(\S+\.yaml)", text):
        text = text.replace(f"launch/accelerate/{name}", str(_cpu_accelerate_config(name, tmp_path)))
    for name in re.findall(r"launch/recipes/(\S+\.yaml)", text):  # the training config names the student too
        config = (RECIPES / name).read_text(encoding="utf-8")
        for hub, local in assets.items():
            config = config.replace(hub, local)
        (tmp_path / name).write_text(config, encoding="utf-8")
        text = text.replace(f"launch/recipes/{name}", str(tmp_path / name))
    lines = []
    for line in text.splitlines():
        if re.search(r"\bbuild-cache\b", line):
            line += f" {BUILD_SIZE}"
        if re.search(r"-m distill\.train\b", line):
            line += f" {TRAIN_SIZE} --fp16 false --bf16 false"
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("script", sorted(RECIPES.glob("*.sh")), ids=lambda p: p.name)
def test_recipe_runs_as_written_on_cpu(script, local_assets, tmp_path):
    out = tmp_path / "out"
    body = _local_script(script, local_assets, tmp_path)
    assert "--deepspeed" in body or "deepspeed:" in (RECIPES / script.name.replace(".sh", ".yaml")).read_text()
    env = {**os.environ, "OUT": str(out), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "NUM_MACHINES": "1", "GPUS_PER_MACHINE": "2", "MACHINE_RANK": "0", "MAIN_IP": "127.0.0.1",
           "PORT": str(_free_port())}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    run = subprocess.run(["bash", "-c", body], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{script.name}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert (out / "student_run" / "student" / "config.json").is_file()
    assert (out / "cache" / "manifest.json").is_file()
    saved = sorted(str(p.relative_to(out)) for p in (out / "student_run").rglob("*"))
    assert list((out / "student_run").glob("checkpoint-*/global_step*")), saved
