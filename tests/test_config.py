"""Config parsing: YAML + CLI (CLI wins), unknown keys, one validation error listing every problem, resolved config."""

from __future__ import annotations

import pytest
import yaml

from cache_tools.format.errors import ConfigError
from distill.train import main
from distill.training.config import parse_config, validate, write_resolved_config


def _yaml(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def test_yaml_values_and_cli_overrides(tmp_path):
    path = _yaml(tmp_path, {"student": "s", "cache": "c", "output_dir": str(tmp_path / "o"), "max_steps": 5,
                            "kd_weight": 0.25, "kd_schedule": "linear:0:0.5", "report_to": ["tensorboard"]})
    cfg = parse_config([path, "--max_steps", "9", "--temperature", "2.0"])
    assert cfg.training.max_steps == 9  # CLI wins
    assert cfg.loss.kd_weight == 0.25 and cfg.loss.kd_schedule == "linear:0:0.5"  # from YAML
    assert cfg.loss.temperature == 2.0
    assert cfg.model.student == "s" and cfg.data.cache == "c"
    assert cfg.training.remove_unused_columns is False
    assert cfg.training.report_to == ["tensorboard"]
    validate(cfg)


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = _yaml(tmp_path, {"student": "s", "kd_wieght": 1.0})
    with pytest.raises(ConfigError, match="kd_wieght"):
        parse_config([path])


def test_unknown_cli_key_exits_nonzero_with_one_line(tmp_path, capsys):
    assert main(["--student", "s", "--cache", "c", "--output_dir", str(tmp_path), "--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--no_such_flag" in err and len(err.splitlines()) == 1


def test_bad_value_type_is_one_line_error():
    with pytest.raises(ConfigError, match="kd_weight"):
        parse_config(["--kd_weight", "lots"])


def test_validate_lists_every_problem_at_once(tmp_path):
    cfg = parse_config(["--kd_weight", "-1", "--temperature", "0", "--kd_kind", "tvd", "--eval_fraction", "1.5",
                        "--kd_schedule", "zigzag", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for needle in ("--student", "--cache", "--kd_weight", "--temperature", "--kd_kind", "--eval_fraction",
                   "--kd_schedule"):
        assert needle in message, needle
    assert message.startswith("7 configuration problem(s)")


def test_lm_only_mode_rejects_teacher_weights(tmp_path):
    cfg = parse_config(["--student", "s", "--dataset", "x.txt", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="kd_weight 0"):
        validate(cfg)  # default kd_weight is 1 and there is no teacher
    validate(parse_config(["--student", "s", "--dataset", "x.txt", "--kd_weight", "0", "--output_dir", str(tmp_path)]))


def test_resolved_config_is_written_and_parses_back(tmp_path):
    cfg = parse_config(["--student", "s", "--cache", "c", "--output_dir", str(tmp_path), "--max_steps", "3",
                        "--feature_weight", "0.5", "--learning_rate", "1e-3"])
    path = write_resolved_config(cfg, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    again = parse_config([str(path)])
    assert again.loss.feature_weight == 0.5 and again.training.max_steps == 3
    assert again.training.learning_rate == pytest.approx(1e-3)
    assert again.to_dict() == cfg.to_dict()


def test_help_lists_our_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--cache" in out and "--kd_weight" in out and "--early_stopping_patience" in out


def test_loss_components_come_from_the_registry(tmp_path):
    """Every registered component gets --{c}_weight / --{c}_schedule / its params, validated the same way."""
    from distill.training.components import COMPONENTS

    cfg = parse_config(["--student", "s", "--cache", "c", "--output_dir", str(tmp_path)])
    for c in COMPONENTS:
        assert getattr(cfg.loss, c.weight_field) == c.default_weight
        assert getattr(cfg.loss, c.schedule_field) == "constant"
        for p in c.params:
            assert getattr(cfg.loss, p.name) == p.default
    bad = parse_config(["--student", "s", "--cache", "c", "--output_dir", str(tmp_path), "--contrastive_weight",
                        "-1", "--feature_schedule", "wobbly", "--contrastive_temperature", "0"])
    with pytest.raises(ConfigError) as info:
        validate(bad)
    for needle in ("--contrastive_weight must be a finite number >= 0", "--feature_schedule",
                   "--contrastive_temperature"):
        assert needle in str(info.value)
    lm_only = parse_config(["--student", "s", "--dataset", "x.txt", "--output_dir", str(tmp_path), "--kd_weight", "0",
                            "--feature_weight", "0.3"])
    with pytest.raises(ConfigError, match="set --feature_weight 0"):
        validate(lm_only)


def test_output_dir_checks_leave_nothing(tmp_path):
    from distill.training.preflight import check_output_dir

    check_output_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # probed, nothing created
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(tmp_path / "f" / "run")
