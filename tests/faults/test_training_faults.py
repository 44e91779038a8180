"""Training faults, through the real command line (`python -m distill.train` in a subprocess): each must end with
exit code 2 and ONE error line on stderr naming the file/flag and the fix (no traceback), and leave nothing
half-written (no exported student, no temp files; refused before training: no output folder at all). Kill/resume
must give the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cache_fixtures import write_synthetic_cache

REPO = Path(__file__).resolve().parents[2]
PROG = "python -m distill.train: error: "
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
           TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
ENV.pop("RANK", None)

# Runs `distill.train.main` with one extra callback: SIGKILL at the end of step KILL_AT_STEP, or truncate every shard
# of TRUNCATE_CACHE to half its size at the end of step 1 (the cache is damaged while training runs).
HARNESS = """
import os, signal, sys
from pathlib import Path
from transformers import TrainerCallback
import distill.train as train

class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AT_STEP", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == 1 and os.environ.get("TRUNCATE_CACHE"):
            for shard in Path(os.environ["TRUNCATE_CACHE"]).glob("*.h5"):
                os.truncate(shard, shard.stat().st_size // 2)

build = train.build_trainer
train.build_trainer = lambda cfg, **kw: build(cfg, extra_callbacks=[Fault()])
raise SystemExit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tokenizer, corpus):
    return write_synthetic_cache(tmp_path_factory.mktemp("faults_cache"), tokenizer, corpus, num_sequences=16,
                                 shard_size=4)


def _argv(student_dir, cache_dir, out, *extra) -> list[str]:
    return ["--student", str(student_dir), "--cache", str(cache_dir), "--output_dir", str(out), "--use_cpu",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
            "--disable_tqdm", "true", "--save_strategy", "no", "--max_steps", "2", "--dataloader_num_workers", "0",
            *map(str, extra)]


def _run(argv: list[str], *, harness: Path | None = None, env: dict | None = None,
         prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(prefix or ([str(harness)] if harness else ["-m", "distill.train"])), *argv]
    return subprocess.run(cmd, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one error line (the last line of stderr) containing every needle."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in lines if "error: " in ln]
    assert errors == lines[-1:] and lines[-1].startswith(PROG), lines[-5:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def _assert_nothing_half_written(out: Path) -> None:
    assert not (out / "student").exists()
    if out.exists():
        leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".write-probe-")]
        assert not leftovers, leftovers


@pytest.mark.faults
def test_output_dir_is_a_file(tmp_path, student_dir, cache_dir):
    target = tmp_path / "taken"
    target.write_text("not a folder\n")
    line = _assert_one_line_error(_run(_argv(student_dir, cache_dir, target)), "--output_dir", str(target),
                                  "choose another --output_dir")
    assert "is a file" in line and target.read_text() == "not a folder\n"


@pytest.mark.faults
def test_output_dir_under_a_file(tmp_path, student_dir, cache_dir):
    parent = tmp_path / "file"
    parent.write_text("x")
    _assert_one_line_error(_run(_argv(student_dir, cache_dir, parent / "out")), "--output_dir", "is a file")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ro); skipped where mounting is not allowed."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                                                        str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.faults
def test_read_only_output_dir(read_only_dir, student_dir, cache_dir):
    out = read_only_dir / "run"
    line = _assert_one_line_error(_run(_argv(student_dir, cache_dir, out)), "--output_dir", str(out),
                                  "choose a writable folder")
    assert "Read-only file system" in line and not out.exists()


@pytest.mark.faults
@pytest.mark.parametrize("layers, needle", [("1,2,3,4,5,6,7", "give one student layer per teacher layer"),
                                            ("0,1,99", "indices must be in [0, ")])
def test_invalid_pool_student_layers_with_aux_losses(tmp_path, student_dir, cache_dir, layers, needle):
    out = tmp_path / "out"
    proc = _run(_argv(student_dir, cache_dir, out, "--feature_weight", "0.5", "--pool_student_layers", layers))
    _assert_one_line_error(proc, "--pool_student_layers", needle)
    assert not out.exists()  # refused before the weights load and before anything is written


@pytest.mark.faults
def test_fp16_under_deepspeed_without_fp16_support(tmp_path, student_dir, cache_dir):
    """A machine whose DeepSpeed accelerator has no fp16 (simulated: DeepSpeed's CPU accelerator reports it has)."""
    out = tmp_path / "out"
    code = ("import sys, deepspeed.accelerator as a; type(a.get_accelerator()).is_fp16_supported = lambda self: False;"
            " from distill.train import main; raise SystemExit(main(sys.argv[1:]))")
    one_rank = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port())}
    proc = _run([*_argv(student_dir, cache_dir, out), "--deepspeed", str(REPO / "ds_configs" / "zero2_fp16.json"),
                 "--fp16", "true"], prefix=["-c", code], env=one_rank)
    _assert_one_line_error(proc, "--fp16", "no fp16 support", "drop --fp16")
    assert not out.exists()  # no distill_config.yaml left behind


@pytest.mark.faults
def test_deepspeed_without_a_launcher(tmp_path, student_dir, cache_dir):
    """`--deepspeed` in one plain process (no launcher) runs as a world of one instead of being refused."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    proc = _run([*_argv(student_dir, cache_dir, out), "--deepspeed", str(REPO / "ds_configs" / "zero2_fp16.json")])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (out / "student" / "config.json").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(out: Path, step: int) -> dict[int, float]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h and "train_runtime" not in h}


@pytest.mark.faults
@pytest.mark.faults_full
def test_kill_mid_run_then_resume_gives_identical_losses(tmp_path, student_dir, cache_dir):
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    common = ["--max_steps", 8, "--logging_steps", 1, "--save_strategy", "steps", "--save_steps", 2,
              "--save_total_limit", 10]
    straight = tmp_path / "straight"
    assert _run(_argv(student_dir, cache_dir, straight, *common), harness=harness).returncode == 0
    killed = tmp_path / "killed"
    proc = _run(_argv(student_dir, cache_dir, killed, *common), harness=harness, env={"KILL_AT_STEP": "5"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL after step 5: checkpoint-4 is the last one
    assert not (killed / "student").exists() and not (killed / "checkpoint-6").exists()
    resumed = _run(_argv(student_dir, cache_dir, killed, *common, "--resume_from_checkpoint", "true"), harness=harness)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _history(straight, 8), _history(killed, 8)
    assert [a[s] for s in range(5, 9)] == pytest.approx([b[s] for s in range(5, 9)], rel=1e-6, abs=1e-7)
    assert (killed / "student" / "config.json").is_file()


@pytest.mark.faults
@pytest.mark.faults_full
def test_cache_truncated_while_training(tmp_path, student_dir, cache_dir):
    """Every shard is cut in half after step 1: the next read fails with one line naming a shard."""
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    out = tmp_path / "out"
    proc = _run(_argv(student_dir, cache, out, "--max_steps", 6), harness=harness, env={"TRUNCATE_CACHE": str(cache)})
    _assert_one_line_error(proc, "shard-")
    _assert_nothing_half_written(out)


# Runs `distill.train.main` with a file-size limit switched on after step N: the save of checkpoint-N then fails the
# way a full disk fails it (EFBIG where ENOSPC would come).
DISK_FULL_HARNESS = """
import os, resource, signal, sys
from transformers import TrainerCallback
import distill.train as train

class Full(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("FULL_AT_STEP", "-1")):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

build = train.build_trainer
train.build_trainer = lambda cfg, **kw: build(cfg, extra_callbacks=[Full()])
raise SystemExit(train.main(sys.argv[1:]))
"""


@pytest.mark.faults
@pytest.mark.faults_full
def test_disk_full_while_saving_a_checkpoint(tmp_path, student_dir, cache_dir):
    """One line naming the folder and the fix, exit 2, the partial folder removed; `--resume_from_checkpoint true`
    then resumes from the last complete checkpoint."""
    harness = tmp_path / "harness.py"
    harness.write_text(DISK_FULL_HARNESS)
    out = tmp_path / "out"
    common = ["--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2, "--save_total_limit", 10]
    proc = _run(_argv(student_dir, cache_dir, out, *common), harness=harness, env={"FULL_AT_STEP": "4"})
    line = _assert_one_line_error(proc, str(out / "checkpoint-4"), "free disk space", "--resume_from_checkpoint true")
    assert "partial folder was removed" in line
    assert not (out / "checkpoint-4").exists() and not (out / "student").exists()
    resumed = _run(_argv(student_dir, cache_dir, out, *common, "--max_steps", 6, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "student" / "config.json").is_file()


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, tokenizer, corpus):
    from cache_tools.format import schema

    targets = schema.TargetsInfo(kind="sampled", encoding="fp16", top_k=0, num_samples=16, sample_temperature=1.0)
    return write_synthetic_cache(tmp_path_factory.mktemp("sampled") / "c", tokenizer, corpus, num_sequences=8,
                                 targets=targets)


@pytest.mark.faults
@pytest.mark.parametrize("flags, needles", [(("--kd_kind", "reverse_kl"), ("reverse_kl", "--kd_kind")),
                                            (("--temperature", "2"), ("--temperature 2", "set --temperature 1"))])
def test_sampled_cache_refuses_kd_it_cannot_serve(tmp_path, student_dir, sampled_cache, flags, needles):
    out = tmp_path / "out"
    line = _assert_one_line_error(_run(_argv(student_dir, sampled_cache, out, *flags)), *needles)
    assert str(sampled_cache / "manifest.json") in line and "sampled targets" in line
    assert not out.exists()
