"""The demo report's figures from TensorBoard runs: the PNG files exist, hold the curves, and the report embeds them."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


def test_figures_from_logged_runs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from examples.demo.plots import BYTES_FIGURE, LOSS_FIGURE, logged_curve, markdown, write_figures

    runs = tmp_path / "runs"
    for name, start in (("kd_student", 5.0), ("lm_student", 5.5)):
        writer = SummaryWriter(str(runs / name))
        for step in (5, 10, 15, 20):
            writer.add_scalar("eval/ce", start - step / 10, step)
        writer.close()
    tag, steps, values = logged_curve(runs / "kd_student", ("eval/ce", "eval/loss"))
    assert tag == "eval/ce" and steps == [5, 10, 15, 20] and values[-1] == pytest.approx(3.0)
    assert logged_curve(runs / "kd_student", ("eval/nothing",)) is None
    figures = write_figures(tmp_path, runs, {"kd_student": "KD", "lm_student": "LM-only"}, 2.9,
                            {"cache": 120.5, "sampled_cache": 40.2})
    assert figures == {"loss": tmp_path / LOSS_FIGURE, "bytes": tmp_path / BYTES_FIGURE}
    for path in figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    lines = markdown(figures)
    assert f"]({LOSS_FIGURE})" in lines[0] and f"]({BYTES_FIGURE})" in lines[2]
    assert "matplotlib" in markdown({})[0]


@pytest.mark.parametrize(("cores", "busy", "threads"), [(2, 0, "2"), (2, 1, "1"), (16, 3, "2"), (2, 9, "1")])
def test_demo_never_pins_more_threads_than_are_free(monkeypatch, cores, busy, threads):
    from examples.demo import common

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(common, "busy_cores", lambda first, second, n: busy)
    monkeypatch.setattr(common.time, "sleep", lambda seconds: None)
    env = common.reproducible_cpu_env()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert "OMP_NUM_THREADS" not in common.reproducible_cpu_env()


def test_busy_cores_counts_what_ran_between_two_snapshots():
    """Busy = the non-idle share of the jiffies between two /proc/stat snapshots (iowait counts as idle), not the
    lagging load average: a machine that just went idle reads as idle."""
    from examples.demo.common import busy_cores

    first = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n"
    half = "cpu  200 0 200 1000 0 0 0 0 0 0\n"  # 200 busy + 200 idle jiffies
    assert busy_cores(first, half, 2) == 1
    assert busy_cores(first, "cpu  100 0 100 1200 0 0 0 0 0 0\n", 2) == 0
    assert busy_cores(first, "cpu  300 0 300 800 0 0 0 0 0 0\n", 4) == 4
    assert busy_cores(first, "cpu  100 0 100 900 100 0 0 0 0 0\n", 2) == 0  # iowait is idle
    assert busy_cores(first, first, 2) == 0  # no time passed


def test_kept_teacher_is_keyed_by_its_inputs_and_restored_whole(tmp_path, monkeypatch):
    from examples.demo import teacher_cache

    monkeypatch.setenv("DISTILL_DEMO_CACHE", str(tmp_path / "kept"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    text, config = tmp_path / "train.jsonl", tmp_path / "config.json"
    text.write_text('{"text": "a"}\n')
    config.write_text("{}")
    settings = {"steps": 10, "lr": 1e-3, "seed": 0}
    key = teacher_cache.teacher_key([text, config], settings)
    assert key == teacher_cache.teacher_key([text, config], dict(settings))
    assert key != teacher_cache.teacher_key([text, config], {**settings, "steps": 11})
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # another thread count takes another path: another teacher
    assert key != teacher_cache.teacher_key([text, config], settings)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert key == teacher_cache.teacher_key([text, config], settings)
    text.write_text('{"text": "b"}\n')
    assert key != teacher_cache.teacher_key([text, config], settings)

    model, run = tmp_path / "teacher" / "student", tmp_path / "runs" / "teacher"
    assert not teacher_cache.restore(key, model, run)
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    run.mkdir(parents=True)
    (run / "events.out.tfevents.1").write_bytes(b"events")
    assert teacher_cache.keep(key, model, run) == tmp_path / "kept" / key
    again_model, again_run = tmp_path / "again" / "student", tmp_path / "again_runs" / "teacher"
    assert teacher_cache.restore(key, again_model, again_run)
    assert (again_model / "model.safetensors").read_bytes() == b"weights"
    assert (again_run / "events.out.tfevents.1").read_bytes() == b"events"
    assert not list((tmp_path / "kept").glob("*.tmp"))


class _FakeProc:
    """A stand-in for subprocess.Popen: finishes (with `code`) once every job of the stage has been started."""

    started: list[_FakeProc] = []
    expected = 0

    def __init__(self, cmd, cwd=None, env=None, stdout=None, stderr=None):
        self.cmd, self.env, self.killed, self.returncode = cmd, env, False, None
        self.code = int(cmd[1])
        _FakeProc.started.append(self)

    def poll(self):
        assert len(_FakeProc.started) == _FakeProc.expected, "a job was waited on before every job had started"
        if self.code >= 0:
            self.returncode = self.code
        return self.returncode

    def kill(self):
        self.killed = True

    def wait(self):
        return self.returncode


def _jobs(tmp_path, codes):
    from examples.demo.common import Job

    _FakeProc.started, _FakeProc.expected = [], len(codes)
    return [Job(f"job{i}", ["prog", str(code)], tmp_path / f"job{i}.log") for i, code in enumerate(codes)]


def test_concurrent_stage_starts_every_job_with_one_thread(monkeypatch, tmp_path):
    from examples.demo import common

    monkeypatch.setattr(common.subprocess, "Popen", _FakeProc)
    monkeypatch.setattr(common.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seconds = common.run_concurrently(_jobs(tmp_path, [0, 0, 0]))
    assert sorted(seconds) == ["job0", "job1", "job2"]
    assert all(p.env["OMP_NUM_THREADS"] == p.env["MKL_NUM_THREADS"] == "1" for p in _FakeProc.started)
    assert (tmp_path / "job1.log").read_text().startswith("$ prog 0")


def test_concurrent_stage_failure_names_the_job_and_stops_the_others(monkeypatch, tmp_path):
    from examples.demo import common

    monkeypatch.setattr(common.subprocess, "Popen", _FakeProc)
    monkeypatch.setattr(common.time, "sleep", lambda seconds: None)
    with pytest.raises(common.DemoError, match=r"job1 failed \(exit 3\); full log: .*job1\.log"):
        common.run_concurrently(_jobs(tmp_path, [-1, 3, -1]))  # -1: still running when job1 fails
    assert [p.killed for p in _FakeProc.started] == [True, False, True]
