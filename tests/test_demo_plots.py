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


@pytest.mark.parametrize(("cores", "load", "threads"), [(2, 0.0, "2"), (2, 1.2, "1"), (16, 3.0, "2"), (2, 9.0, "1")])
def test_demo_never_pins_more_threads_than_are_free(monkeypatch, cores, load, threads):
    from examples.demo import common

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(common.os, "getloadavg", lambda: (load, load, load))
    env = common.reproducible_cpu_env()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert "OMP_NUM_THREADS" not in common.reproducible_cpu_env()


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
