"""Vocabulary map (exact twins, first_token / tail rules, saved + reused) and the vectorised top-k remapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from xtok_fixtures import trained_tokenizer

from distill.data.xtok import vocab_map as vm
from distill.data.xtok.token_bytes import token_bytes_table
from distill.data.xtok.topk_map import map_topk


@pytest.fixture(scope="module")
def pair(tokenizer, corpus):
    student = trained_tokenizer(corpus, 400, split_digits=True)
    return tokenizer, student, token_bytes_table(tokenizer, "teacher"), token_bytes_table(student)


def test_exact_twins_match_vocab_strings(pair):
    teacher, student, tb, sb = pair
    vmap = vm.build_vocab_map(teacher, student, tb, sb, "tail", "t" * 64, "s" * 64)
    s_vocab = student.get_vocab()
    specials = set(student.all_special_ids)
    # Both are byte-level: equal vocabulary strings <=> equal byte strings (an oracle independent of the decoder).
    for token, t_id in teacher.get_vocab().items():
        twin = s_vocab.get(token)
        if t_id in tb.special_ids:
            continue
        if twin is not None and twin not in specials:
            assert vmap.ids[t_id] == twin and vmap.exact[t_id]
        else:
            assert vmap.ids[t_id] == -1 and not vmap.exact[t_id]
    assert vmap.ids[teacher.eos_token_id] == student.eos_token_id
    assert 0 < vmap.num_exact < len(teacher)


def test_first_token_rule_credits_a_prefix_token(pair):
    teacher, student, tb, sb = pair
    vmap = vm.build_vocab_map(teacher, student, tb, sb, "first_token", "t" * 64, "s" * 64)
    exact = vm.build_vocab_map(teacher, student, tb, sb, "tail", "t" * 64, "s" * 64)
    np.testing.assert_array_equal(vmap.ids[exact.exact], exact.ids[exact.exact])
    rest = np.flatnonzero(~vmap.exact & (vmap.ids >= 0))
    assert rest.size > 0
    for t_id in rest.tolist():
        t_str = teacher.convert_ids_to_tokens(t_id)
        s_str = student.convert_ids_to_tokens(int(vmap.ids[t_id]))
        assert t_str.startswith(s_str) and len(s_str) < len(t_str)
    # Digits are split one by one by the student: a teacher "Ġ2019"-style token begins with the student's "Ġ" or "2".
    multi_digit = [i for t, i in teacher.get_vocab().items() if sum(c.isdigit() for c in t) >= 2]
    for t_id in multi_digit:
        assert not vmap.exact[t_id]


def test_map_saved_beside_cache_and_reused(pair, tmp_path, monkeypatch):
    teacher, student, tb, sb = pair
    vmap, path = vm.load_or_build_vocab_map(tmp_path, teacher, student, tb, sb, "first_token", "a" * 64, "b" * 64)
    assert path == tmp_path / "vocab_maps" / f"{'a' * 16}-{'b' * 16}-{vm.MAP_VERSION}-first_token.npz"
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp*"))

    def must_not_build(*args, **kwargs):
        raise AssertionError("map rebuilt instead of reused")

    monkeypatch.setattr(vm, "build_vocab_map", must_not_build)
    again, again_path = vm.load_or_build_vocab_map(tmp_path, teacher, student, tb, sb, "first_token", "a" * 64,
                                                   "b" * 64)
    assert again_path == path
    np.testing.assert_array_equal(again.ids, vmap.ids)


def test_read_only_cache_dir_falls_back_to_user_cache(pair, tmp_path, monkeypatch):
    teacher, student, tb, sb = pair
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    real_save = vm.save_vocab_map

    def refuse_cache_dir(vmap, path):
        if str(path).startswith(str(tmp_path / "cache")):
            raise PermissionError(13, "Read-only file system")
        real_save(vmap, path)

    monkeypatch.setattr(vm, "save_vocab_map", refuse_cache_dir)
    (tmp_path / "cache").mkdir()
    _, path = vm.load_or_build_vocab_map(tmp_path / "cache", teacher, student, tb, sb, "tail", "c" * 64, "d" * 64)
    assert path is not None and path.is_relative_to(tmp_path / "user") and path.is_file()


def test_map_topk_merges_duplicates_and_moves_unmapped_mass_to_tail():
    map_ids = np.array([0, 1, 1, -1, 2, 3, 4])  # teacher 1 and 2 share student 1; teacher 3 has no student token
    exact = np.array([True, True, False, False, True, True, True])
    probs = np.array([[0.4, 0.2, 0.15, 0.1, 0.05], [0.5, 0.2, 0.1, 0.05, 0.05]])
    ids = np.array([[4, 1, 2, 3, 9], [0, 5, 4, 1, 6]])  # id 9 is a padded head row: past the map, unmapped
    lp = np.log(probs).astype(np.float16)
    tail = np.log(1 - probs.sum(1)).astype(np.float32)
    out = map_topk(ids, lp, tail, map_ids, exact)
    p = np.exp(lp.astype(np.float64))
    # Row 0: student 1 gets p1 + p2 and moves ahead of student 2; teacher 3 and 9 -> tail.
    np.testing.assert_array_equal(out.ids[0], [2, 1, -1, -1, -1])
    np.testing.assert_allclose(np.exp(out.logprobs[0, :2]), [p[0, 0], p[0, 1] + p[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.tail[0]), np.exp(tail[0]) + p[0, 3] + p[0, 4], rtol=1e-6)
    # Row 1: nothing merged or lost: values pass through bit for bit.
    np.testing.assert_array_equal(out.ids[1], [0, 3, 2, 1, 4])
    np.testing.assert_array_equal(out.logprobs[1], lp[1].astype(np.float32))
    assert out.tail[1] == tail[1]
    # Mass bookkeeping: every bit of teacher mass is either on a student id or in the tail.
    assert abs(out.teacher_mass - p.sum()) < 1e-9
    assert abs(out.mapped_mass - (p.sum() - p[0, 3] - p[0, 4])) < 1e-9
    total = np.where(out.ids >= 0, np.exp(out.logprobs.astype(np.float64)), 0).sum(1) + np.exp(out.tail)
    np.testing.assert_allclose(total, p.sum(1) + np.exp(tail.astype(np.float64)), rtol=1e-6)
    for row in out.ids:
        kept = row[row >= 0]
        assert len(set(kept.tolist())) == len(kept)


def test_maps_from_other_code_are_rebuilt_not_reused(pair, tmp_path, monkeypatch):
    """The map's version is a fingerprint of the code that decides it: a map saved by other code (another
    fingerprint) is never picked up, and editing that code changes the fingerprint without a manual bump."""
    teacher, student, tb, sb = pair
    assert vm.MAP_VERSION == vm.map_fingerprint() and len(vm.MAP_VERSION) == 16
    monkeypatch.setattr(vm, "MAP_VERSION", "0123456789abcdef")
    _, old_path = vm.load_or_build_vocab_map(tmp_path, teacher, student, tb, sb, "first_token", "a" * 64, "b" * 64)
    monkeypatch.undo()
    built = []
    real_build = vm.build_vocab_map
    monkeypatch.setattr(vm, "build_vocab_map", lambda *a, **k: built.append(1) or real_build(*a, **k))
    _, new_path = vm.load_or_build_vocab_map(tmp_path, teacher, student, tb, sb, "first_token", "a" * 64, "b" * 64)
    assert built == [1] and new_path != old_path and old_path.is_file()
    # Same file name, stale contents (e.g. copied by hand): refused too.
    new_path.write_bytes(old_path.read_bytes())
    assert vm.load_vocab_map(new_path, "a" * 64, "b" * 64, "first_token") is None
    # Editing the map's source changes the fingerprint.
    edited = tmp_path / "token_bytes.py"
    edited.write_text(Path(vm.token_bytes.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(vm.token_bytes, "__file__", str(edited))
    assert vm.map_fingerprint() != vm.MAP_VERSION
