"""A teacher that produces NaN/inf stops the build at the batch where it happens, naming the sequence and the fix;
and `teacher_batch` with sampling equals `sample_targets` on the model's own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_testing import cache_arrays

from cache_tools import cli, teacher
from cache_tools.builder import BuildOptions, build_cache
from cache_tools.format import schema
from cache_tools.format.errors import BuildError
from cache_tools.teacher import Sampling

MAX_LENGTH, SHARD_SIZE = 32, 4


def _options(model_dir, dataset, output, **overrides) -> BuildOptions:
    settings = dict(teacher=str(model_dir), dataset=str(dataset), output=str(output), max_length=MAX_LENGTH, top_k=8,
                    shard_size=SHARD_SIZE, batch_size=2, max_samples=20, progress=False, device="cpu")
    settings.update(overrides)
    return BuildOptions(**settings)


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory, teacher_dir, text_file):
    out = tmp_path_factory.mktemp("clean") / "c"
    build_cache(_options(teacher_dir, text_file, out))
    return cache_arrays(out)


@pytest.fixture(scope="module")
def loaded(teacher_dir):
    return teacher.load_teacher(str(teacher_dir), None, trust_remote_code=False, dtype="fp32",
                                device=torch.device("cpu"))


def _first_new_token(input_ids: np.ndarray, after: int) -> tuple[int, int]:
    """(token, window): a token whose first occurrence is in window >= `after` (never in an earlier window)."""
    seen = set(input_ids[:after].ravel().tolist())
    for window in range(after, len(input_ids)):
        fresh = [t for t in input_ids[window].tolist() if t not in seen]
        if fresh:
            return fresh[0], window
        seen.update(input_ids[window].tolist())
    raise AssertionError(f"no token first seen after window {after}")


def test_fp16_overflow_stops_the_build_naming_the_sequence(clean_build, teacher_dir, tokenizer, text_file, tmp_path,
                                                           capsys):
    from transformers import AutoModelForCausalLM

    token, window = _first_new_token(clean_build[schema.INPUT_IDS], after=SHARD_SIZE + 1)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    with torch.no_grad():  # finite in fp32, beyond fp16's 65,504 (inf) once loaded with --dtype fp16
        model.get_input_embeddings().weight[token] = 1e5
    poisoned = tmp_path / "poisoned"
    model.save_pretrained(poisoned)
    tokenizer.save_pretrained(poisoned)
    out = tmp_path / "cache"
    args = ["build-cache", "--teacher", str(poisoned), "--dataset", str(text_file), "--output", str(out),
            "--max-length", str(MAX_LENGTH), "--top-k", "8", "--shard-size", str(SHARD_SIZE), "--batch-size", "2",
            "--max-samples", "20", "--dtype", "fp16", "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert cli.main(args) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("cache_tools build-cache: error:")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr  # one line (the rest is HF's loading progress)
    assert f"in sequence {window} (global index" in err[0] and "--dtype bf16" in err[0] and "--dtype fp32" in err[0]
    bad_shard = window // SHARD_SIZE
    files = sorted(p.name for p in out.iterdir())
    assert not any(name.startswith(schema.shard_name(bad_shard).split(".")[0]) for name in files), files
    for index in range(bad_shard):  # earlier shards finished and stay for a rerun
        assert schema.shard_name(index) in files
    # The same poisoned teacher in fp32 builds, with the targets of the clean teacher for windows without the token.
    assert cli.main([*args[:-4], "fp32", "--device", "cpu", "--no-progress", "--overwrite"]) == 0
    assert np.isfinite(cache_arrays(out)[schema.TOPK_LOGPROBS].astype(np.float32)).all()


def _hook_nan(module: torch.nn.Module, row: int, value: float):
    """Forward hook that writes `value` into row `row` (batch row, or token row of a 2-D output) of the output."""
    def hook(_module, _inputs, output):
        output = output.clone()
        output[row, ..., 3:4] = value
        return output
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["final_norm", "lm_head"])
@pytest.mark.parametrize("sampled", [False, True])
def test_injected_nan_or_inf_names_the_sequence(loaded, where, sampled):
    ids = torch.randint(1, loaded.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    module = loaded.model.base_model.norm if where == "final_norm" else loaded.model.get_output_embeddings()
    # lm_head sees the [N, H] valid tokens: token row 15 belongs to batch row 1.
    handle = _hook_nan(module, 1 if where == "final_norm" else 15, float("nan") if sampled else float("inf"))
    sampling = Sampling(torch.rand(3, 10, 5, dtype=torch.float64)) if sampled else None
    try:
        with pytest.raises(BuildError, match=r"in sequence 41 \(global index; 1 sequence"):
            teacher.teacher_batch(loaded, ids, mask, [-1], 4, first_sequence=40, sampling=sampling)
    finally:
        handle.remove()
    out = teacher.teacher_batch(loaded, ids, mask, [-1], 4, first_sequence=40, sampling=sampling)  # hook gone: fine
    assert torch.isfinite(out[schema.POOLED_HIDDEN]).all()


def test_sampled_batch_equals_sample_targets_on_the_models_logits(loaded):
    torch.manual_seed(0)
    ids = torch.randint(1, loaded.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    uniforms = torch.stack([torch.cat([teacher.sequence_uniforms(5, 100 + row, int(mask[row].sum()), 16),
                                       torch.zeros(12 - int(mask[row].sum()), 16, dtype=torch.float64)])
                            for row in range(2)])
    out = teacher.teacher_batch(loaded, ids, mask, [-1], 4, sampling=Sampling(uniforms, temperature=1.5))
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits[..., : loaded.vocab_size]
    ref_ids, ref_counts = teacher.sample_targets(logits[mask.bool()], uniforms[mask.bool()], temperature=1.5)
    assert torch.equal(out[schema.SAMPLE_IDS][mask.bool()], ref_ids)
    assert torch.equal(out[teacher.SAMPLE_COUNTS][mask.bool()], ref_counts)
    assert (out[teacher.SAMPLE_COUNTS][mask.bool()].sum(-1) == 16).all()
    assert (out[schema.SAMPLE_IDS][1, 7:] == -1).all() and (out[teacher.SAMPLE_COUNTS][1, 7:] == 0).all()
