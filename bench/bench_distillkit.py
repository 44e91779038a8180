"""Quality per byte against DistillKit's logit compression, run with DistillKit's OWN encoder and decoder.

    DISTILLKIT_SRC=/path/to/DistillKit python -m bench.bench_distillkit [--quick]
    DISTILLKIT_SRC=/path/to/DistillKit python -m bench --only distillkit

DistillKit (arcee-ai/DistillKit) is not a dependency: point `DISTILLKIT_SRC` at a checkout of its source (the folder
holding `distillkit/`); only `distillkit.compression` is imported (it needs torch and pydantic). Without it the
benchmark reports "skipped" with the reason, so CI stays green.

Teacher rows at Qwen's vocabulary (V = 151,936 head rows): the Witten-Bell bigram teacher of `bench/codec_teachers.py`
plain and sharpened, each also with per-position Gaussian logit noise (sigma 0.5 nats, as `bench_storage`'s
non-repeating variant) so that no two rows are alike (a real teacher's rows never repeat; zstd finds repeats).
Formats, each encoded and decoded by its own code:
- DistillKit recommended (k = 128, 16 exact bf16, polynomial [0..4, sqrt]) and budget (k = 50, 1 exact, [0, 1, sqrt]),
  the configurations its README gives; decoded with its `decompress_to_sparse`, then carried into this project's
  top-k + tail representation with the tail mass implied by the decoded values (1 - their sum; DistillKit's
  `symmetric_uniform` missing-mass handling is the same tail bucket).
- Ours: compact top-256 and top-64 (zstd blobs, 7-bit levels, exact float32 tail), sampled N = 16 and N = 64.
Bytes/token count the targets only (every other field of a cache is the same for all formats): DistillKit's two byte
arrays per position as it stores them, our blobs per 512-position window (+ 4 B float32 tail for top-k).
Quality: `distill.losses.fused_ce_kd_loss` (forward KL, T = 1, KD only) on the decoded targets against the EXACT KL to
the full teacher row, on identical student logits (teacher log-probs / 1.2 + Gaussian noise, sigma 0.5: near the
teacher; sigma 2: early training): signed relative KD loss error, and cosine + norm ratio of the logit gradient.
Sampled targets are one draw per row: their loss value is KL(empirical || student), not an estimate of the full KL,
and their gradient is unbiased but noisy (the cosine shows the noise of one batch).
A figure (quality vs bytes/token) goes to docs/quality_per_byte.png on a full run.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, WORK_ROOT, ratio, run_standalone
from bench.quality_report import STUDENT_SIGMAS, figure, markdown

ENV_VAR = "DISTILLKIT_SRC"
VOCAB = 151_936
WINDOW = 512  # positions per blob, as a cache window
NOISE_SIGMA = 0.5  # nats of per-position logit noise of the non-repeating teacher rows
SETTINGS = {True: dict(rows=64, loss_rows=32, sets=1), False: dict(rows=512, loss_rows=128, sets=None)}
FIGURE = REPO_ROOT / "docs" / "quality_per_byte.png"
# DistillKit README's configurations, as given there (d is filled in with the vocabulary), and each with its own
# `normalize_t` option: as given, the fit runs in the input's float32 with t = 0..k-1 (t^4 up to 1.6e8) and a
# pseudo-inverse that drops singular values below 1e-5, so later ranks decode nats off; t in [0, 1] fits as well as a
# float64 least-squares fit. Same bytes either way.
_RECOMMENDED = dict(k=128, exact_k=16, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, 3, 4, "sqrt"],
                    term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False)
_BUDGET = dict(k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"], term_dtype="float32",
               residual_bins=[], delta_encoding=False, error_diffusion=False)
DISTILLKIT_CONFIGS = {
    "DistillKit recommended k=128 exact 16": _RECOMMENDED,
    "DistillKit recommended k=128 exact 16 normalize_t": {**_RECOMMENDED, "normalize_t": True},
    "DistillKit budget k=50 exact 1": _BUDGET,
    "DistillKit budget k=50 exact 1 normalize_t": {**_BUDGET, "normalize_t": True},
}
OURS = {"ours compact top-256": ("topk", 256), "ours compact top-128": ("topk", 128),
        "ours compact top-64": ("topk", 64), "ours compact top-50": ("topk", 50),
        "ours sampled N=16": ("sampled", 16), "ours sampled N=64": ("sampled", 64)}


def load_distillkit() -> tuple[Any, str]:
    """(DistillKit's `distillkit.compression` module, "") or (None, why it cannot be used)."""
    src = os.environ.get(ENV_VAR, "")
    if not src:
        return None, f"set {ENV_VAR} to a DistillKit source checkout (the folder holding distillkit/) to compare"
    if not (Path(src) / "distillkit" / "compression").is_dir():
        return None, f"{ENV_VAR}={src} holds no distillkit/compression folder"
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        module = importlib.import_module("distillkit.compression")
        module.LogprobCompressor, module.DistributionQuantizationConfig  # noqa: B018 - lazy exports: import them now
    except ImportError as err:
        return None, f"DistillKit's compression module does not import from {src}: {err}"
    return module, ""


def nonrepeating(logp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same rows with i.i.d. Gaussian logit noise per position and id, renormalised (padded rows stay -inf)."""
    finite = np.isfinite(logp)
    noisy = np.where(finite, logp + NOISE_SIGMA * rng.standard_normal(logp.shape).astype(np.float32), -np.inf)
    top = noisy.max(1, keepdims=True)
    norm = top + np.log(np.exp((noisy - top).astype(np.float64)).sum(1, keepdims=True))
    return (noisy - norm).astype(np.float32)


def distillkit_targets(compression: Any, config: dict[str, Any], logp: np.ndarray) -> dict[str, Any]:
    """DistillKit's compress -> decompress_to_sparse of full rows [n, V] -> our (ids, log-probs, tail) + its bytes."""
    import torch

    cfg = compression.DistributionQuantizationConfig(d=VOCAB, **config)
    comp = compression.LogprobCompressor(config=cfg)
    packed = comp.compress(torch.from_numpy(logp))
    arrays = [packed["compressed_logprobs"], packed["bytepacked_indices"]]
    ids, lp, tail = implied_tail(*comp.decompress_to_sparse(packed))
    raw = np.concatenate([a.numpy().astype(np.uint8) for a in arrays], axis=1)
    mass_over_one = float((np.exp(lp.numpy().astype(np.float64)).sum(1) > 1.0).mean())
    return {"ids": ids.numpy(), "lp": lp.numpy(), "tail": tail.numpy(), "bytes": raw.shape[1],
            "bytes_zstd": _zstd_bytes(raw), "mass_over_one": mass_over_one,
            "value_bytes": cfg.logprob_bits() // 8}


def implied_tail(ids: Any, lp: Any) -> tuple[Any, Any, Any]:
    """DistillKit's decoded (ids, log-probs) -> our (ids int64, log-probs float32, tail log-mass float32): the tail is
    whatever mass the decoded values leave (clamped when an approximation overshoots 1)."""
    import torch

    lp = lp.float()
    mass = lp.double().exp().sum(-1)
    return ids.long(), lp, torch.log1p(-mass.clamp(max=1.0 - 1e-7)).float()


def distillkit_roundtrip(compression: Any, config: dict[str, Any], ids: Any, lp: Any,
                         vocab: int = VOCAB) -> tuple[Any, Any, Any]:
    """Teacher top-k (ids, log-probs) torch [n, >= k], sorted or not -> DistillKit's `compress_from_sparse` of the top
    `config["k"]` -> its decode -> our (ids, log-probs, tail): what its capture script stores and its trainer reads."""
    cfg = compression.DistributionQuantizationConfig(d=vocab, **config)
    comp = compression.LogprobCompressor(config=cfg)
    k = config["k"]
    top, order = lp.float().topk(k, dim=-1)
    return implied_tail(*comp.decompress_to_sparse(comp.compress_from_sparse(ids.gather(-1, order), top)))


def _zstd_bytes(raw: np.ndarray) -> float:
    """DistillKit's bytes per position after zstd (level 3) per window: what a general compressor adds on top."""
    import zstandard

    comp = zstandard.ZstdCompressor(level=3)
    return sum(len(comp.compress(raw[i : i + WINDOW].tobytes())) for i in range(0, len(raw), WINDOW)) / len(raw)


def ours_topk(logp: np.ndarray, k: int) -> dict[str, Any]:
    from bench.codec_teachers import topk_targets
    from cache_tools.format import codec_zstd

    ids, lp, tail = topk_targets(logp, k)
    out_ids, out_lp, size = [], [], 0
    for i in range(0, len(ids), WINDOW):
        blob = codec_zstd.encode_topk(ids[i : i + WINDOW], lp[i : i + WINDOW], VOCAB, sequence=i)
        size += blob.size
        got = codec_zstd.decode_topk(blob, len(ids[i : i + WINDOW]), k, VOCAB, sequence=i)
        out_ids.append(got[0])
        out_lp.append(got[1])
    return {"ids": np.concatenate(out_ids), "lp": np.concatenate(out_lp), "tail": tail,
            "bytes": size / len(ids) + 4}


def id_bytes(logp: np.ndarray, k: int) -> float:
    """Bytes/token our top-k blob spends on the ids alone (all levels equal, so zstd erases them): the cost of the
    ids under our coding, to pair with another format's value bytes."""
    from bench.codec_teachers import topk_targets
    from cache_tools.format import codec_zstd

    ids = topk_targets(logp, k)[0]
    flat = np.zeros(ids.shape, np.float32)
    size = sum(codec_zstd.encode_topk(ids[i : i + WINDOW], flat[i : i + WINDOW], VOCAB, sequence=i).size
               for i in range(0, len(ids), WINDOW))
    return size / len(ids)


def ours_sampled(logp: np.ndarray, draws: int, rng: np.random.Generator) -> dict[str, Any]:
    from cache_tools.format import codec_zstd

    n = logp.shape[0]
    ids = np.full((n, draws), -1, np.int64)
    counts = np.zeros((n, draws), np.int32)
    cdf = np.cumsum(np.exp(logp.astype(np.float64)), axis=1)
    for row in range(n):
        got = np.searchsorted(cdf[row], rng.random(draws) * cdf[row, -1], side="right")
        uniq, cnt = np.unique(np.minimum(got, logp.shape[1] - 1), return_counts=True)
        ids[row, : uniq.size], counts[row, : uniq.size] = uniq, cnt
    size = 0
    for i in range(0, n, WINDOW):
        blob = codec_zstd.encode_sampled(ids[i : i + WINDOW], counts[i : i + WINDOW], draws, VOCAB, sequence=i)
        size += blob.size
        got_ids, got_counts = codec_zstd.decode_sampled(blob, len(ids[i : i + WINDOW]), draws, VOCAB, sequence=i)
        assert (got_ids == ids[i : i + WINDOW]).all() and (got_counts == counts[i : i + WINDOW]).all()
    lp = np.where(counts > 0, np.log(np.maximum(counts, 1) / draws), 0.0).astype(np.float32)
    return {"ids": ids, "lp": lp, "tail": np.full(n, -np.inf, np.float32), "bytes": size / n}


def exact_kd(student: np.ndarray, logp: np.ndarray) -> tuple[float, np.ndarray]:
    """Forward KL(teacher || student) at T = 1 over the whole vocabulary, mean over rows, and its logit gradient."""
    import torch

    z = torch.from_numpy(student).double()
    log_q = z.log_softmax(-1)
    lp = torch.from_numpy(logp).double()
    p = lp.exp()
    rows = (p * (torch.where(p > 0, lp, 0.0) - log_q)).sum(-1)
    return float(rows.mean()), ((log_q.exp() - p) / len(z)).numpy()


def format_kd(student: np.ndarray, t: dict[str, Any], targets: str) -> tuple[float, np.ndarray]:
    """The project's fused loss (KD only) on decoded targets; hidden = identity so grad_weight^T is the logit grad."""
    import torch

    from distill.losses import KDConfig, fused_ce_kd_loss

    n = student.shape[0]
    hidden = torch.eye(n, dtype=torch.float32, requires_grad=True)
    weight = torch.from_numpy(np.ascontiguousarray(student.T)).requires_grad_(True)
    out = fused_ce_kd_loss(hidden, weight, torch.full((n,), -100), torch.from_numpy(t["ids"]),
                           torch.from_numpy(np.ascontiguousarray(t["lp"], np.float32)), torch.from_numpy(t["tail"]),
                           torch.ones(n, dtype=torch.bool), ce_weight=0.0, config=KDConfig(targets=targets))
    out.loss.backward()
    return float(out.kd), weight.grad.T.numpy().astype(np.float64)


def quality(logp: np.ndarray, formats: dict[str, tuple[str, dict[str, Any]]], rng) -> dict[str, Any]:
    out: dict[str, Any] = {}
    true_v = int(np.isfinite(logp[0]).sum())
    for sigma in STUDENT_SIGMAS:
        student = np.full(logp.shape, -30.0, np.float32)  # padded head rows: finite, far below
        student[:, :true_v] = logp[:, :true_v] / 1.2 + sigma * rng.standard_normal((len(logp), true_v))
        ref_loss, ref_grad = exact_kd(student, logp)
        for name, (targets, t) in formats.items():
            loss, grad = format_kd(student, t, targets)
            norm = np.sqrt((grad**2).sum() * (ref_grad**2).sum())
            out.setdefault(name, {})[f"sigma={sigma}"] = {
                "kd": loss, "kd_exact": ref_loss, "rel_err": (loss - ref_loss) / ref_loss,
                "cos": float((grad * ref_grad).sum() / norm), "norm_ratio": float(np.sqrt((grad**2).sum() /
                                                                                         (ref_grad**2).sum()))}
    return out


def teacher_sets(rows: int, limit: int | None, rng) -> list[tuple[str, np.ndarray]]:
    from bench.codec_teachers import teacher_sets as base_sets

    sets = []
    for base in base_sets(rows)[:limit]:
        sets.append((base.name, base.logprobs))
        sets.append((f"{base.name} non-repeating", nonrepeating(base.logprobs, rng)))
    return sets[: 2 * limit if limit else None]


def measure_set(compression: Any, logp: np.ndarray, loss_rows: int, rng) -> dict[str, Any]:
    """Bytes/token of every format on all rows, and its KD quality on the first `loss_rows` rows."""
    formats: dict[str, tuple[str, dict[str, Any]]] = {}
    hybrids = {}
    for name, config in DISTILLKIT_CONFIGS.items():
        formats[name] = t = ("topk", distillkit_targets(compression, config, logp))
        if config.get("normalize_t"):  # the idea worth taking, on its sound variant only
            hybrids[f"ours ids + {name} values"] = id_bytes(logp, config["k"]) + t[1]["value_bytes"]
    for name, (kind, k) in OURS.items():
        formats[name] = (kind, ours_topk(logp, k) if kind == "topk" else ours_sampled(logp, k, rng))
    sizes = {name: {key: v for key, v in t.items() if not isinstance(v, np.ndarray)} for name, (_, t) in
             formats.items()}
    head = {name: (kind, {key: v[:loss_rows] if isinstance(v, np.ndarray) else v for key, v in t.items()})
            for name, (kind, t) in formats.items()}
    out = {"sizes": sizes, "quality": quality(logp[:loss_rows], head, rng)}
    for name, size in hybrids.items():  # same values as DistillKit's, so the same quality; only the ids cost less
        out["sizes"][name] = {"bytes": size, "estimate": "our id coding + DistillKit's value bytes"}
        out["quality"][name] = out["quality"][name.split(" + ")[1].removesuffix(" values")]
    return out


def run(quick: bool, device: str) -> dict[str, Any]:
    compression, why = load_distillkit()
    if compression is None:
        return {"status": "skipped", "notes": [why]}
    settings = SETTINGS[quick]
    rng = np.random.default_rng(0)
    per_set = {name: measure_set(compression, logp, settings["loss_rows"], rng)
               for name, logp in teacher_sets(settings["rows"], settings["sets"], rng)}
    path = WORK_ROOT / "quality_per_byte.png" if quick else FIGURE
    figure(per_set, path)
    ratios: dict[str, Any] = {}
    for fmt in next(iter(per_set.values()))["sizes"]:
        qs = [q for s in per_set.values() for q in s["quality"][fmt].values()]
        worst = max(per_set.values(), key=lambda s: s["sizes"][fmt]["bytes"])["sizes"][fmt]["bytes"]
        ratios[f"{fmt} targets bytes/token (worst set)"] = ratio(worst, 1.0, "", "absolute")
        ratios[f"{fmt} worst |KD loss error|"] = ratio(max(abs(q["rel_err"]) for q in qs), 1.0, "", "absolute")
        ratios[f"{fmt} worst grad cosine"] = ratio(min(q["cos"] for q in qs), 1.0, "", "absolute")
    return {"ratios": ratios, "per_set": per_set, "table": markdown(per_set), "figure": str(path),
            "shapes": {"vocab": VOCAB, "window": WINDOW, **settings},
            "dtype": "DistillKit: its bytes (bf16 exact values, fp32 terms, packed ids); ours: format 3 blobs; "
                     "loss fp32 (exact reference fp64) on CPU",
            "notes": [f"DistillKit from {os.environ.get(ENV_VAR)}; tail = 1 - decoded mass (its symmetric_uniform)",
                      "sampled: one draw per row (loss value is KL to the empirical distribution)"]}


if __name__ == "__main__":
    raise SystemExit(run_standalone(run, __doc__.split("\n\n")[0]))
