"""The divergence registry: every registered divergence is consistent (parameters declared on KDConfig, analytic
gradient == autograd, zero on identical distributions), the trainer config uses it as its only source, validation
lists every problem, and a divergence added to the registry alone runs through the fused kernel and the reference."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from distill.losses import DIVERGENCES, KD_KINDS, KDConfig, fused_ce_kd_loss, naive_ce_kd_loss
from distill.losses.buckets import bucket_kd, bucket_kd_and_grad
from distill.losses.config import FLAG_NAMES
from distill.losses.divergences import PARAMS, Divergence, Param

BASE_FIELDS = {"kind", "temperature", "use_tail", "chunk_size", "targets", "teacher_tempered"}


def test_trainer_config_takes_the_kinds_from_the_registry():
    from distill.training import config

    assert config.KD_KINDS is KD_KINDS and KD_KINDS == tuple(DIVERGENCES)
    assert {"forward_kl", "reverse_kl", "jsd"} <= set(KD_KINDS)


def test_every_parameter_is_a_kdconfig_field_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(KDConfig)}
    assert set(fields) == BASE_FIELDS | set(PARAMS), "a Param without a KDConfig field, or a field without a Param"
    for p in PARAMS.values():
        assert fields[p.name] == p.default and p.low < p.default < p.high, p.name


def _random_buckets(seed: int, rows: int = 6, buckets: int = 9):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, buckets, generator=gen) * 2
    teacher = (torch.randn(rows, buckets, generator=gen) * 2).log_softmax(-1)
    valid = torch.rand(rows, buckets, generator=gen) > 0.25
    valid[:, 0] = True
    return student, teacher, valid


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("targets", ["topk", "sampled"])
def test_analytic_gradient_equals_autograd(kind, temperature, targets):
    student, teacher, valid = _random_buckets(int(temperature * 10))
    cfg = KDConfig(kind=kind, temperature=temperature, jsd_beta=0.3, targets="topk")
    cfg = dataclasses.replace(cfg, targets=targets)  # bucket math only: the sampled refusal is validate()'s job
    rows, grad = bucket_kd_and_grad(student, teacher, valid, cfg)
    student = student.clone().requires_grad_(True)
    ref_rows = bucket_kd(student, teacher, valid, cfg)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), student)
    torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert (rows > 0).all() and torch.all(grad[~valid] == 0)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_zero_on_identical_distributions(kind):
    student, _, valid = _random_buckets(1)
    rows, grad = bucket_kd_and_grad(student, student.log_softmax(-1), valid, KDConfig(kind=kind, temperature=1.7))
    assert rows.abs().max() < 1e-5 and grad.abs().max() < 1e-5


def test_validation_lists_every_problem_once_with_flags_or_fields():
    bad = KDConfig(kind="tvd", temperature=0.0, chunk_size=0, jsd_beta=1.0)
    problems = bad.problems()
    assert len(problems) == 4 and all(p.startswith("KDConfig.") for p in problems), problems
    flags = bad.problems(flags=True)
    for flag in ("--kd_kind", "--temperature", "--jsd_beta", "--loss_chunk_size"):
        assert sum(p.startswith(flag) for p in flags) == 1, (flag, flags)
    with pytest.raises(ValueError, match="KDConfig.kind must be one of forward_kl.*; KDConfig.temperature"):
        bad.validate()


def test_from_args_reads_the_trainer_flags_by_name():
    args = SimpleNamespace(kd_kind="jsd", temperature=2.0, use_tail=False, loss_chunk_size=64, jsd_beta=0.2,
                           unrelated=1)
    cfg = KDConfig.from_args(args, targets="sampled")
    assert cfg == KDConfig(kind="jsd", temperature=2.0, use_tail=False, chunk_size=64, jsd_beta=0.2, targets="sampled")
    assert set(FLAG_NAMES) <= {f.name for f in dataclasses.fields(KDConfig)}


def _fused_and_naive(config: KDConfig):
    """Both implementations on one small top-k batch (13 rows, V = 20, K = 4) -> [(kd, grad_hidden)] x 2."""
    gen = torch.Generator().manual_seed(0)
    n, h, v, k = 13, 6, 20, 4
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    logprobs, ids = torch.randn(n, v, generator=gen).log_softmax(-1).topk(k, dim=-1)
    tail = torch.log1p(-logprobs.exp().sum(-1))
    labels, kd_mask = torch.randint(0, v, (n,), generator=gen), torch.ones(n, dtype=torch.bool)
    results = []
    for fn in (fused_ce_kd_loss, naive_ce_kd_loss):
        hidden_ = hidden.clone().requires_grad_(True)
        out = fn(hidden_, weight, labels, ids, logprobs, tail, kd_mask, ce_weight=0.0, config=config)
        out.loss.backward()
        results.append((out.kd, hidden_.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
    return results


def test_a_divergence_added_to_the_registry_runs_everywhere(monkeypatch):
    """Registering a new divergence (no analytic gradient: the kernel falls back to autograd) is all it takes for the
    fused kernel and the reference to agree on it. Here: total variation, 0.5 * sum |p - q|, with a made-up scale."""
    tvd = Divergence(
        name="tvd_test",
        value=lambda log_p, log_q, config: 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1) * config.jsd_beta,
        params=(Param("jsd_beta", 0.5, 0.0, 1.0, "(borrowed parameter)"),),
    )
    monkeypatch.setitem(DIVERGENCES, "tvd_test", tvd)
    ((kd, _), _) = _fused_and_naive(KDConfig(kind="tvd_test", jsd_beta=0.8, chunk_size=4))
    assert kd.item() > 0.01


def test_skew_kl_from_the_command_line(tmp_path):
    from distill.training.config import parse_config

    cfg = parse_config(["--kd_kind", "skew_kl", "--skew_alpha", "0.3", "--student", "x", "--cache", "y",
                        "--output_dir", str(tmp_path)])
    kd = KDConfig.from_args(cfg.loss)
    assert (kd.kind, kd.skew_alpha) == ("skew_kl", 0.3)
    ((value, _), _) = _fused_and_naive(kd)
    assert value.item() > 0.01


def test_loss_target_kinds_match_the_cache_format():
    """The losses name the target kinds themselves (they never import the format); both lists must agree."""
    from cache_tools.format.schema import TARGET_KINDS as FORMAT_KINDS
    from distill.losses import TARGET_KINDS as LOSS_KINDS

    assert tuple(LOSS_KINDS) == tuple(FORMAT_KINDS)


def test_teacher_tempering_is_an_explicit_field():
    """The loss tempers the teacher unless told it already is; the default follows the target kind."""
    from distill.losses.buckets import bucket_log_probs, tail_temperature

    assert KDConfig().tempers_teacher and not KDConfig(targets="sampled").tempers_teacher
    tempered = KDConfig(temperature=2.0, teacher_tempered=True)
    assert not tempered.tempers_teacher and tail_temperature(tempered) == 2.0
    student, teacher, valid = _random_buckets(3)
    log_p, _ = bucket_log_probs(student, teacher, valid, tempered)
    as_given = torch.where(valid, teacher, -1.0e9).log_softmax(-1)
    torch.testing.assert_close(log_p, as_given)
    assert "teacher_tempered" in KDConfig(targets="sampled", teacher_tempered=False).problems()[0]
    assert KDConfig(targets="topk").for_targets("sampled").validate().teacher_tempered is None


def test_a_kdconfig_is_checked_once_when_built():
    bad = KDConfig(kind="tvd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        bad.kind = "forward_kl"  # what construction checked cannot change afterwards
    assert bad.problems() == bad.problems() and bad.problems()[0].startswith("KDConfig.kind")
