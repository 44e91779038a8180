"""Every shipped DeepSpeed config and accelerate recipe parses and names only options the libraries know."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
RECIPES = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


def _no_auto(section: dict) -> dict:
    """HF fills "auto" at run time; give each a concrete stand-in so DeepSpeed's own schema can check the rest."""
    return {k: (_no_auto(v) if isinstance(v, dict) else 1 if v == "auto" else v) for k, v in section.items()}


def _deepspeed_top_level_keys() -> set[str]:
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    return {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}


def test_every_stage_and_precision_is_shipped():
    names = {p.stem for p in DS_CONFIGS}
    for stage in ("zero1", "zero2", "zero2_offload", "zero3"):
        for precision in ("fp16", "bf16"):
            assert f"{stage}_{precision}" in names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_names_real_options(path):
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads(path.read_text())
    unknown = set(config) - _deepspeed_top_level_keys()
    assert not unknown, unknown
    zero = DeepSpeedZeroConfig(**_no_auto(config["zero_optimization"]))  # pydantic, extra="forbid"
    assert int(zero.stage) == int(path.stem[len("zero")])
    assert (zero.offload_optimizer is not None) == ("offload" in path.stem)
    for field in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert config[field] == "auto"
    if path.stem.endswith("fp16"):
        fp16 = DeepSpeedFP16Config(**_no_auto(config["fp16"]))
        assert config["fp16"]["enabled"] == "auto" and fp16.loss_scale == 0  # 0 = dynamic loss scaling
        assert "bf16" not in config
    else:
        DeepSpeedBF16Config(**_no_auto(config["bf16"]))
        assert config["bf16"]["enabled"] == "auto" and "fp16" not in config
    if int(zero.stage) == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # export needs it


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_accelerate_recipe_names_real_options(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    raw = yaml.safe_load(path.read_text())
    launch_options = {action.dest for action in launch_command_parser()._actions}
    for key in raw.get("deepspeed_config") or {}:
        assert key in launch_options, key
    if config.deepspeed_config:
        assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()
    assert config.mixed_precision in (None, "no", "fp16", "bf16")


def test_recipes_cover_the_documented_setups():
    names = {p.stem for p in RECIPES}
    assert {"p100_fp16_single_gpu", "multi_gpu_zero2", "zero3", "cpu"} <= names
    p100 = yaml.safe_load((REPO / "launch" / "accelerate" / "p100_fp16_single_gpu.yaml").read_text())
    assert p100["mixed_precision"] == "fp16" and p100["num_processes"] == 1  # the P100 (sm_60) has no bf16
