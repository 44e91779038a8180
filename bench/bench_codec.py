"""Codec benchmark: bytes/token, KD accuracy and decode speed of `cache_tools.format.codec` at the Qwen vocabulary.

    python -m bench.bench_codec [--quick]        (or: python -m bench --only codec)

Teacher rows: a Witten-Bell bigram model of tinyshakespeare under the real Qwen3 tokenizer, plain and sharpened
(`bench/codec_teachers.py`; a synthetic Zipf teacher when ../shared is absent). V = 151,936 head rows, K = 256.
- Size: compact top-256 blob bytes/token (+ 4 B of float32 tail, stored beside it by the format) against the fp16
  layout (uint32 ids + fp16 log-probs + float32 tail); sampled N = 64 blob bytes/token (lossless: checked).
- Accuracy: `distill.losses.fused_ce_kd_loss` (KD only, ce_weight 0) on identical student logits, once with the fp16
  targets and once with the compact ones (same ids, same exact tail): relative difference of the KD loss and cosine
  of the gradient w.r.t. the student logits. Hidden = identity [N, N] and weight = student logits^T [V, N], so the
  logits are exactly the chosen ones and grad_weight^T IS the logit gradient. Students: teacher log-probs / 1.2 +
  Gaussian noise (sigma 0.5: close to the teacher, the hard case for a relative loss error; sigma 2: early training),
  at T = 1 (the default) and T = 2, for level_bits 5, 6 (default) and 7.
- Speed: process CPU time of decoding a sequence vs turning stored uint32 ids + fp16 log-probs into int64/float32
  (what reading an fp16 cache costs after the bytes are in memory), same sequences, same run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.common import ratio, run_standalone
from cache_tools.format.codec import LEVEL_BITS

VOCAB = 151_936
K = 256
NUM_SAMPLES = 64
SETTINGS = {True: dict(rows=64, loss_rows=32, seq=64, level_bits=(LEVEL_BITS,)),
            False: dict(rows=512, loss_rows=192, seq=512, level_bits=(5, 6, 7))}


def kd_loss_and_grad(student: np.ndarray, ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, temperature: float):
    """(KD loss, logit gradient [N, V]) of the project's fused loss on exactly these student logits [N, V]."""
    import torch

    from distill.losses import KDConfig, fused_ce_kd_loss

    n = student.shape[0]
    hidden = torch.eye(n, dtype=torch.float32, requires_grad=True)
    weight = torch.from_numpy(np.ascontiguousarray(student.T)).requires_grad_(True)  # [V, N]
    out = fused_ce_kd_loss(hidden, weight, torch.full((n,), -100), torch.from_numpy(ids), torch.from_numpy(lp),
                           torch.from_numpy(tail), torch.ones(n, dtype=torch.bool), ce_weight=0.0,
                           config=KDConfig(temperature=temperature))
    out.loss.backward()
    return float(out.kd), weight.grad.T.numpy().astype(np.float64)


def accuracy(rows, settings, rng) -> dict[str, Any]:
    from bench.codec_teachers import topk_targets
    from cache_tools.format.codec import decode_topk, encode_topk

    logp = rows.logprobs[: settings["loss_rows"]]
    ids, lp, tail = topk_targets(logp, K)
    n = ids.shape[0]
    fp16 = lp.astype(np.float16).astype(np.float32)
    compact = {}
    for bits in settings["level_bits"]:
        got_ids, got_lp = decode_topk(encode_topk(ids, lp, VOCAB, level_bits=bits), n, K, VOCAB)
        order = np.argsort(got_ids, 1)  # align to the fp16 rows' id order: the loss sees the same slots
        ref_order = np.argsort(ids, 1)
        aligned = np.empty_like(lp)
        np.put_along_axis(aligned, ref_order, np.take_along_axis(got_lp, order, 1), 1)
        compact[bits] = aligned
    out = {}
    for sigma in (0.5, 2.0):
        student = np.full((n, VOCAB), -30.0, np.float32)  # padded head rows: finite, far below
        true_v = logp.shape[1] - int(np.isinf(logp[0]).sum())
        student[:, :true_v] = logp[:, :true_v] / 1.2 + sigma * rng.standard_normal((n, true_v)).astype(np.float32)
        for temperature in (1.0, 2.0):
            ref_loss, ref_grad = kd_loss_and_grad(student, ids, fp16, tail, temperature)
            for bits, lp_c in compact.items():
                loss, grad = kd_loss_and_grad(student, ids, lp_c, tail, temperature)
                cos = float((grad * ref_grad).sum() / np.sqrt((grad**2).sum() * (ref_grad**2).sum()))
                out[f"{rows.name} sigma={sigma} T={temperature:g} bits={bits}"] = {
                    "kd_fp16": ref_loss, "kd_compact": loss, "rel_diff": abs(loss - ref_loss) / ref_loss, "cos": cos}
    return out


def sample_counts(logp: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """N draws per row from the teacher (T = 1) -> distinct ids [n, N] (-1 padded), counts [n, N]."""
    ids = np.full((logp.shape[0], NUM_SAMPLES), -1, np.int64)
    counts = np.zeros_like(ids, dtype=np.int32)
    cdf = np.cumsum(np.exp(logp.astype(np.float64)), axis=1)
    for row in range(logp.shape[0]):
        draws = np.searchsorted(cdf[row], rng.random(NUM_SAMPLES) * cdf[row, -1], side="right")
        uniq, cnt = np.unique(np.minimum(draws, logp.shape[1] - 1), return_counts=True)
        ids[row, : uniq.size], counts[row, : uniq.size] = uniq, cnt
    return ids, counts


def id_code_bytes(ids: np.ndarray, uniform: bool = True) -> dict[str, float]:
    """Bytes/token of the id gaps alone under each candidate code (per-row best parameter), and the Elias-Fano and
    uniform-subset information figures, for the design note."""
    from math import lgamma, log

    from cache_tools.format.codec_bits import best_k, code_cost

    gaps = np.diff(np.sort(ids, 1), axis=1, prepend=-1) - 1
    out = {}
    for name, eg, k_max in (("exp_golomb", True, 24), ("rice", False, 24)):
        ks = best_k(gaps, None, k_max, eg)
        out[name] = float(sum(code_cost(gaps[i], int(ks[i]), eg).sum() for i in range(len(ks))) / len(ks) / 8)
    low = int(np.floor(np.log2(VOCAB / K)))
    out["elias_fano"] = (K * low + K + (VOCAB >> low) + 1) / 8
    true_v = 151_669
    out["uniform_subset_bound"] = (lgamma(true_v + 1) - lgamma(K + 1) - lgamma(true_v - K + 1)) / log(2) / 8
    if uniform:  # the worst case for a log-cost code: ids with no skew at all
        rng = np.random.default_rng(1)
        random_ids = np.stack([rng.choice(true_v, K, replace=False) for _ in range(min(len(ids), 128))])
        out["uniformly_random_ids_exp_golomb"] = id_code_bytes(random_ids, uniform=False)["exp_golomb"]
    return out


def cpu_seconds(fn, reps: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def sizes_and_speed(rows, settings, rng) -> dict[str, Any]:
    from bench.codec_teachers import entropy, topk_targets
    from cache_tools.format.codec import decode_sampled, decode_topk, encode_sampled, encode_topk

    ids, lp, _ = topk_targets(rows.logprobs, K)
    n, seq = ids.shape[0], settings["seq"]
    blobs = [encode_topk(ids[i : i + seq], lp[i : i + seq], VOCAB) for i in range(0, n, seq)]
    topk_bpt = sum(b.size for b in blobs) / n + 4  # + float32 tail
    sharp = entropy(rows.logprobs) < 1.0
    s_ids, s_counts = sample_counts(rows.logprobs, rng)
    s_blobs = [encode_sampled(s_ids[i : i + seq], s_counts[i : i + seq], NUM_SAMPLES, VOCAB) for i in range(0, n, seq)]
    for i, blob in enumerate(s_blobs):  # lossless, or the benchmark fails
        got_ids, got_counts = decode_sampled(blob, min(seq, n - i * seq), NUM_SAMPLES, VOCAB)
        assert (got_ids == s_ids[i * seq : (i + 1) * seq]).all() and (got_counts == s_counts[i * seq :][:seq]).all()
    stored = [(ids[i : i + seq].astype(np.uint32).tobytes(), lp[i : i + seq].astype(np.float16).tobytes())
              for i in range(0, n, seq)]

    def read_fp16():
        for id_bytes, lp_bytes in stored:
            np.frombuffer(id_bytes, np.uint32).astype(np.int64), np.frombuffer(lp_bytes, np.float16).astype(np.float32)

    reps = 3 if settings["rows"] > 100 else 1
    t_fp16 = cpu_seconds(read_fp16, reps * 10)
    t_topk = cpu_seconds(lambda: [decode_topk(b, min(seq, n - i * seq), K, VOCAB) for i, b in enumerate(blobs)], reps)
    t_samp = cpu_seconds(lambda: [decode_sampled(b, min(seq, n - i * seq), NUM_SAMPLES, VOCAB)
                                  for i, b in enumerate(s_blobs)], reps)
    t_enc = cpu_seconds(lambda: [encode_topk(ids[i : i + seq], lp[i : i + seq], VOCAB) for i in range(0, n, seq)], 1)
    v3 = format_3(ids, lp, s_ids, s_counts, seq, reps)
    return {
        "format_3": v3,
        "topk_bytes_per_token": topk_bpt,
        "fp16_bytes_per_token": K * (4 + 2) + 4,
        "sampled_bytes_per_token": sum(b.size for b in s_blobs) / n,
        "sampled_distinct_per_position": float((s_ids >= 0).sum() / n),
        "sharp_rows_fraction": float(sharp.mean()),
        "id_code_bytes_per_token": id_code_bytes(ids),
        "positions_per_cpu_s": {"fp16_read": n / t_fp16, "compact_topk_decode": n / t_topk,
                                "sampled_decode": n / t_samp, "compact_topk_encode": n / t_enc},
    }


def finish_topk_torch(steps, levels, lp_max, ranges, level_bits: int, table):
    """`codec_zstd.finish_topk` in torch: what a training device would run on the small arrays a collator ships
    (uint16 steps + uint8 levels + a float and a byte per row instead of int64 ids + float32 log-probs)."""
    import torch

    ids = torch.cumsum(steps.to(torch.int64), dim=1)
    order = torch.sort(levels.to(torch.int16), dim=1, stable=True).indices
    cell = torch.gather(levels, 1, order).to(torch.int64) + (ranges.to(torch.int64) << level_bits)[:, None]
    return torch.gather(ids, 1, order), lp_max[:, None] - table.view(-1)[cell]


def format_3(ids, lp, s_ids, s_counts, seq: int, reps: int) -> dict[str, Any]:
    """Format 3 (zstd) blobs of the same rows: bytes/token, and CPU us per position of each decode step: the whole
    decode in the worker, its first half (checksum, zstd, byte planes), the final step (cumsum, stable sort by level,
    table gather) in numpy, and the same final step in torch (CPU here; a GPU does it in microseconds per batch)."""
    import torch

    from cache_tools.format import codec_zstd
    from cache_tools.format.codec import level_table

    n = ids.shape[0]
    cuts = list(range(0, n, seq))
    blobs = [codec_zstd.encode_topk(ids[i : i + seq], lp[i : i + seq], VOCAB, sequence=i) for i in cuts]
    s_blobs = [codec_zstd.encode_sampled(s_ids[i : i + seq], s_counts[i : i + seq], NUM_SAMPLES, VOCAB, sequence=i)
               for i in cuts]
    rows = [min(seq, n - i) for i in cuts]
    parts = [codec_zstd.topk_parts(b, m, K, VOCAB, sequence=i) for b, m, i in zip(blobs, rows, cuts, strict=True)]
    small = [(torch.from_numpy(p[0].astype(np.uint16)), torch.from_numpy(p[1].copy()), torch.from_numpy(p[2].copy()),
              torch.from_numpy(p[3].copy()), p[4]) for p in parts]
    table = torch.from_numpy(level_table(parts[0][4]))
    for p, got in zip(small, parts, strict=True):  # the torch finish gives the same arrays
        t_ids, t_lp = finish_topk_torch(*p, table)
        ref_ids, ref_lp = codec_zstd.finish_topk(*got, VOCAB)
        assert (t_ids.numpy() == ref_ids).all() and (t_lp.numpy() == ref_lp).all()
    us = {
        "decode_in_worker": cpu_seconds(lambda: [codec_zstd.decode_topk(b, m, K, VOCAB, sequence=i)
                                                 for b, m, i in zip(blobs, rows, cuts, strict=True)], reps),
        "parts_in_worker": cpu_seconds(lambda: [codec_zstd.topk_parts(b, m, K, VOCAB, sequence=i)
                                                for b, m, i in zip(blobs, rows, cuts, strict=True)], reps),
        "finish_numpy": cpu_seconds(lambda: [codec_zstd.finish_topk(*p, VOCAB) for p in parts], reps),
        "finish_torch_cpu": cpu_seconds(lambda: [finish_topk_torch(*p, table) for p in small], reps),
        "sampled_decode": cpu_seconds(lambda: [codec_zstd.decode_sampled(b, m, NUM_SAMPLES, VOCAB, sequence=i)
                                               for b, m, i in zip(s_blobs, rows, cuts, strict=True)], reps),
    }
    return {"topk_bytes_per_token": sum(b.size for b in blobs) / n + 4,
            "sampled_bytes_per_token": sum(b.size for b in s_blobs) / n,
            "cpu_us_per_position": {k: 1e6 * v / n for k, v in us.items()},
            "shipped_bytes_per_position": {"decoded (int64 ids + float32 log-probs)": K * 12,
                                           "small arrays (uint16 steps + uint8 levels + row max/range)": K * 3 + 5}}


def run(quick: bool, device: str) -> dict[str, Any]:
    from bench.codec_teachers import teacher_sets

    settings = SETTINGS[quick]
    rng = np.random.default_rng(0)
    sets = teacher_sets(settings["rows"])[: 1 if quick else None]
    per_set = {rows.name: sizes_and_speed(rows, settings, rng) for rows in sets}
    acc: dict[str, Any] = {}
    for rows in sets:
        acc.update(accuracy(rows, settings, rng))
    default_bits = LEVEL_BITS
    ratios: dict[str, Any] = {}
    for name, s in per_set.items():
        ratios[f"{name} top-256 bytes/token"] = ratio(s["topk_bytes_per_token"], 1.0, "<= 600", "absolute")
        ratios[f"{name} top-256 compact/fp16 bytes"] = ratio(s["topk_bytes_per_token"], s["fp16_bytes_per_token"])
        ratios[f"{name} sampled N=64 bytes/token"] = ratio(s["sampled_bytes_per_token"], 1.0, "<= 64", "absolute")
        speed = s["positions_per_cpu_s"]
        ratios[f"{name} decode top-k/fp16 speed"] = ratio(speed["compact_topk_decode"], speed["fp16_read"])
        v3 = s["format_3"]
        fp16_us = 1e6 / speed["fp16_read"]
        ratios[f"{name} format 3 top-256 bytes/token"] = ratio(v3["topk_bytes_per_token"], 1.0, "", "absolute")
        ratios[f"{name} format 3 / format 2 top-256 bytes"] = ratio(v3["topk_bytes_per_token"],
                                                                   s["topk_bytes_per_token"])
        ratios[f"{name} format 3 sampled N=64 bytes/token"] = ratio(v3["sampled_bytes_per_token"], 1.0, "<= 45",
                                                                   "absolute")
        ratios[f"{name} format 3 decode top-k/fp16 speed"] = ratio(
            fp16_us, v3["cpu_us_per_position"]["decode_in_worker"], "", "fp16 conversion CPU us/position")
        ratios[f"{name} format 3 worker half (parts)/fp16 speed"] = ratio(
            fp16_us, v3["cpu_us_per_position"]["parts_in_worker"], "", "fp16 conversion CPU us/position")
        ratios[f"{name} decode sampled/fp16 speed"] = ratio(speed["sampled_decode"], speed["fp16_read"])
    for temperature in ("1", "2"):
        chosen = [v for k, v in acc.items() if f"T={temperature} bits={default_bits}" in k]
        ratios[f"worst KD rel diff T={temperature}"] = ratio(max(v["rel_diff"] for v in chosen), 1.0, "<= 0.005")
        ratios[f"worst grad cosine T={temperature}"] = ratio(min(v["cos"] for v in chosen), 1.0, ">= 0.999")
    return {
        "ratios": ratios, "sizes_and_speed": per_set, "accuracy": acc,
        "shapes": {"vocab": VOCAB, "top_k": K, "num_samples": NUM_SAMPLES, **settings},
        "dtype": "compact blobs vs uint32 ids + fp16 log-probs; loss in fp32 on CPU",
        "notes": [f"teachers: {', '.join(per_set)} (bench/codec_teachers.py); accuracy at level_bits={default_bits}",
                  "speed: process CPU time, single thread, bytes already in memory (HDF5 reads not included)"],
    }


if __name__ == "__main__":
    raise SystemExit(run_standalone(run, __doc__.split("\n\n")[0]))
