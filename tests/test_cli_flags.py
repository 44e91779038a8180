"""Every entry point refuses a prefix of a flag (argparse would silently take `--learning_rat` for
`--learning_rate`) and an unknown flag, in one line that names the closest real flag; exit 2."""

from __future__ import annotations

import pytest

from cache_tools.format.cli_args import unknown_options_message, with_suggestions


def _entry(name: str):
    if name == "cache_tools":
        from cache_tools.cli import main
    elif name == "distill.train":
        from distill.train import main
    elif name == "distill.evaluate":
        from distill.evaluate import main
    elif name == "distill.coverage":
        from distill.coverage import main
    elif name == "distill.prepare_xtok":
        from distill.prepare_xtok import main
    elif name == "examples.demo":
        from examples.demo.__main__ import main
    elif name == "bench":
        from bench.__main__ import main
    else:
        from bench.ablation import main
    return main


CASES = [  # (entry point, argv with a cut-off flag, the flag it should suggest)
    ("distill.train", ["--student", "s", "--cache", "c", "--output_dir", "o", "--learning_rat", "1e-3"],
     "--learning_rate"),
    ("distill.train", ["--student", "s", "--cache", "c", "--output_dir", "o", "--max_step", "3"], "--max_steps"),
    ("cache_tools", ["build-cache", "--teacher", "t", "--dataset", "d", "--output", "o", "--max-len", "64"],
     "--max-length"),
    ("cache_tools", ["build-cache", "--teach", "t", "--dataset", "d", "--output", "o"], "--teacher"),
    ("cache_tools", ["inspect", "c", "--js"], "--json"),
    ("distill.evaluate", ["--student", "s", "--batch", "4"], "--batch_size"),
    ("distill.coverage", ["c", "--student-tok", "s"], "--student-tokenizer"),
    ("distill.prepare_xtok", ["c", "--student-tokenizer", "s", "--work", "2"], "--workers"),
    ("examples.demo", ["--qui"], "--quick"),
    ("bench", ["--qui"], "--quick"),
    ("bench.ablation", ["--seed", "1"], "--seeds"),
]


@pytest.mark.parametrize(("entry", "argv", "suggested"), CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_a_cut_off_flag_is_refused_with_the_closest_flag(entry, argv, suggested, capsys):
    main = _entry(entry)
    try:
        status = main(argv)
    except SystemExit as exit_:  # entry points that parse outside run_cli exit from the parser
        status = exit_.code
    assert status == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    flag = next(a for a in argv if a.startswith("--") and f"{a} (did you mean" in err[0])
    assert f"unknown option(s) {flag} (did you mean {suggested}?)" in err[0]


def test_a_mistyped_yaml_key_is_refused_with_the_closest_key(tmp_path, capsys):
    from distill.train import main

    config = tmp_path / "run.yaml"
    config.write_text("student: s\ncache: c\noutput_dir: o\nlearning_rat: 0.001\n", encoding="utf-8")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key(s) learning_rat (did you mean learning_rate?)" in err and "\n" not in err


def test_suggestions():
    assert with_suggestions(["--learnin_rate", "--zzz"], ["--learning_rate", "--seed"]) == \
        "--learnin_rate (did you mean --learning_rate?), --zzz"
    assert unknown_options_message(["stray"], ["--a"], "x --help") == "unexpected argument(s) stray; see `x --help`"


def test_train_help_shows_our_flags_first_and_groups_the_rest(capsys):
    from distill.train import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    order = [text.index(h) for h in ("student model:", "teacher cache / data:", "losses:", "run:",
                                     "training (transformers TrainingArguments", "other TrainingArguments")]
    assert order == sorted(order)
    assert "--kd_kind" in text and "--learning_rate (default" in text and "--adam_beta1," in text
    assert len(text.splitlines()) < 300
    assert main(["--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--adam_beta1 ADAM_BETA1" in full and len(full.splitlines()) > len(text.splitlines())



@pytest.mark.parametrize(("argv", "imports_transformers"), [
    (["--help"], False), (["inspect", "--help"], False), (["verify", "--help"], False),
    (["build-cache", "--help"], True)])
def test_only_build_cache_imports_transformers(argv, imports_transformers):
    """`cache_tools --help` and the commands other than build-cache must not import transformers (seconds of CPU
    before a help text appears); build-cache needs it for its dataclass options."""
    import subprocess
    import sys

    probe = (f"import sys\nfrom cache_tools.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
             "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == str(imports_transformers)
