"""Train-step benchmark: the same student and batch trained three ways, timed in one run.

1. LM-only: student forward with full logits, cross-entropy, backward, AdamW step (plain language-model training).
2. KD from the cache: student hidden states -> `distill.losses.fused_ce_kd_loss` on cache-format targets (top-k ids,
   fp16-rounded log-probs, exact tail), backward, step. The targets are the teacher's, made once before timing in the
   exact form the cache stores them; reading them from disk is the loader benchmark's job.
3. Online KD (bench/online_kd.py): teacher forward every step + full-logit KD + CE, backward, step.

Ratios: cached / LM-only (goal <= 1.05); online / cached next to its ideal 1 + teacher-forward / cached-step, and the
measured ratio as a fraction of that ideal (goal >= 0.90). Run alone: `python -m bench.bench_step [--quick]`.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch

from bench.common import ratio, run_standalone, time_fn
from bench.online_kd import OnlineKDStep, full_logit_kd_loss, next_token_labels

# Default = a SmolLM-sized vocabulary (49,152) with narrow models, so the head/loss share of the step is realistic
# while a CPU can still run it; quick = a smoke test only.
SHAPES = {
    True: dict(vocab=4096, batch=2, seq=64, student_hidden=64, student_layers=2, teacher_hidden=128,
               teacher_layers=2, top_k=64, iters=3),
    False: dict(vocab=49152, batch=4, seq=256, student_hidden=192, student_layers=4, teacher_hidden=256,
                teacher_layers=4, top_k=256, iters=5),
}


def make_models(shape: dict[str, int], device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from examples.tiny_models import tiny_llama_config, tiny_qwen3_moe_config

    torch.manual_seed(0)
    teacher_cfg = tiny_qwen3_moe_config(shape["vocab"], hidden_size=shape["teacher_hidden"],
                                        layers=shape["teacher_layers"])
    student_cfg = tiny_llama_config(shape["vocab"], hidden_size=shape["student_hidden"],
                                    layers=shape["student_layers"])
    teacher = AutoModelForCausalLM.from_config(teacher_cfg).to(device).eval()
    student = AutoModelForCausalLM.from_config(student_cfg).to(device).train()
    return teacher, student


@torch.no_grad()
def cache_targets(teacher: torch.nn.Module, input_ids: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """The cache's per-token targets for a [B, T] batch, flattened to N = B*T rows: topk_ids [N, K] int64,
    topk_logprobs [N, K] float32 (rounded through fp16 as stored), tail_logprob [N] float32."""
    logits = teacher(input_ids=input_ids).logits.float().flatten(0, 1)
    logprobs = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = logprobs.topk(top_k, dim=-1)
    rest = logits.scatter(1, top_ids, float("-inf"))
    tail = (torch.logsumexp(rest, dim=-1) - torch.logsumexp(logits, dim=-1)).clamp_min(-100.0)
    return {"topk_ids": top_ids, "topk_logprobs": top_lp.half().float(), "tail_logprob": tail}


def run(quick: bool, device: str) -> dict[str, Any]:
    from distill.losses import KDConfig, fused_ce_kd_loss

    shape = SHAPES[quick]
    teacher, student = make_models(shape, device)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).to(device)
    labels = next_token_labels(input_ids)
    flat_labels = labels.flatten()
    targets = cache_targets(teacher, input_ids, shape["top_k"])
    kd_mask = torch.ones_like(flat_labels, dtype=torch.bool)
    kd_config = KDConfig()

    students = {name: copy.deepcopy(student) for name in ("lm", "cached", "online")}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in students.items()}

    def lm_step() -> None:
        model, opt = students["lm"], optims["lm"]
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), flat_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cached_step() -> None:
        model, opt = students["cached"], optims["cached"]
        hidden = model.model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
        out = fused_ce_kd_loss(hidden, model.get_output_embeddings().weight, flat_labels, targets["topk_ids"],
                               targets["topk_logprobs"], targets["tail_logprob"], kd_mask, config=kd_config)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    online = OnlineKDStep(students["online"], teacher, optims["online"])

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(input_ids=input_ids)

    def online_loss_only() -> None:
        # Where the online step's extra time goes beyond the teacher forward: the full-vocabulary KD itself.
        with torch.no_grad():
            s_logits = students["online"](input_ids=input_ids).logits
            t_logits = teacher(input_ids=input_ids).logits
        full_logit_kd_loss(s_logits, t_logits, labels)

    # Profile of the difference between the two student steps: the head + loss alone (forward + backward) on fixed
    # hidden states, so "where does the time go" has an answer when cached/LM-only misses its goal.
    with torch.no_grad():
        fixed_hidden = students["lm"].model(input_ids=input_ids).last_hidden_state.flatten(0, 1)
    head = students["lm"].get_output_embeddings().weight

    def lm_head_loss() -> None:
        h = fixed_hidden.detach().requires_grad_()
        torch.nn.functional.cross_entropy((h @ head.t()).float(), flat_labels).backward()

    def cached_head_loss() -> None:
        h = fixed_hidden.detach().requires_grad_()
        fused_ce_kd_loss(h, head, flat_labels, targets["topk_ids"], targets["topk_logprobs"],
                         targets["tail_logprob"], kd_mask, config=kd_config).loss.backward()

    iters = shape["iters"]
    # Round-robin: iteration i of every variant runs back to back, so a neighbour's CPU burst hits all variants
    # alike; the per-variant median then discards the bursts.
    variants = {"lm_only": lm_step, "cached_kd": cached_step, "online_kd": lambda: online(input_ids, labels),
                "teacher_forward": teacher_forward}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(iters if quick else 2 * iters):
        for name, fn in variants.items():
            samples[name].append(time_fn(fn, device, warmup=0, iters=1)["median_s"])
    times = {name: statistics.median(values) for name, values in samples.items()}
    times["online_fwd_only"] = time_fn(online_loss_only, device, warmup=1, iters=iters)["median_s"]
    times["lm_head_loss_fwd_bwd"] = time_fn(lm_head_loss, device, warmup=1, iters=iters)["median_s"]
    times["cached_head_loss_fwd_bwd"] = time_fn(cached_head_loss, device, warmup=1, iters=iters)["median_s"]

    ideal = 1.0 + times["teacher_forward"] / times["cached_kd"]
    online_over_cached = times["online_kd"] / times["cached_kd"]
    tokens = shape["batch"] * shape["seq"]
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("student", student), ("teacher", teacher))}
    return {
        "ratios": {
            "cached_kd/lm_only": ratio(times["cached_kd"], times["lm_only"], "<= 1.05", "LM-only step"),
            "online_kd/cached_kd": ratio(times["online_kd"], times["cached_kd"], "", "cached KD step"),
            "ideal online/cached": {"value": ideal, "goal": "", "met": None,
                                    "baseline": "1 + teacher forward / cached step"},
            "(online/cached)/ideal": ratio(online_over_cached, ideal, ">= 0.90", "ideal"),
        },
        "seconds_per_step": times,
        "tokens_per_s": {k: tokens / v for k, v in times.items() if k in ("lm_only", "cached_kd", "online_kd")},
        "shapes": {**shape, "tokens_per_step": tokens, "params": n_params},
        "dtype": "fp32",
        "notes": ["targets made once in cache form (fp16 log-probs + exact tail); disk reads are in bench_loader",
                  f"loss = distill.losses.fused_ce_kd_loss (KDConfig defaults: {kd_config})"],
    }


if __name__ == "__main__":
    raise SystemExit(run_standalone(run, "train-step benchmark"))
