"""The teacher side of a build: load model + tokenizer with up-front checks, and turn one padded batch into cache
targets (top-k over the TRUE vocabulary, exact tail mass, pooled hidden states) without ever materialising
[batch, seq, vocab] logits in fp32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache_tools import schema

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp32 logits per chunk are at most this many bytes (x3 for the temporaries of topk/logsumexp/scatter).
_CHUNK_LOGIT_BYTES = 1 << 27


class BuildError(Exception):
    """Bad input to a build: a one-line message naming the flag/file and the fix."""


@dataclass
class LoadedTeacher:
    model: Any
    tokenizer: Any
    vocab_size: int  # true vocabulary = len(tokenizer)
    head_rows: int
    num_layers: int
    hidden_size: int
    max_positions: int | None
    config_hash: str
    model_type: str


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` -> bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    if name != "auto":
        if name not in DTYPES:
            raise BuildError(f"--dtype {name}: unknown; use auto, fp16, bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_config_and_tokenizer(teacher: str, tokenizer_src: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    """Config + tokenizer only (cheap), so flag errors surface before the weights are read."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(teacher).expanduser()
    looks_local = path.exists() or teacher.startswith((".", "/", "~")) or teacher.count("/") > 1
    if looks_local and not path.is_dir():
        raise BuildError(f"--teacher {teacher}: no such model directory; pass a saved model folder or a hub id")
    try:
        config = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    except Exception as err:  # OSError/ValueError from the hub client or a broken config.json
        raise BuildError(f"--teacher {teacher}: cannot load the config ({_one_line(err)}); pass a model folder or "
                         "hub id (custom code needs --trust-remote-code)") from err
    src = tokenizer_src or teacher
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as err:
        flag = "--tokenizer" if tokenizer_src else "--teacher"
        raise BuildError(f"{flag} {src}: cannot load the tokenizer ({_one_line(err)}); pass --tokenizer") from err
    return config, tokenizer


def check_settings(config: Any, tokenizer: Any, *, top_k: int, max_length: int, pool_layers: list[int]) -> list[int]:
    """Validate the flags against the teacher; returns pool layers as non-negative hidden_states indices."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_rows = int(text_config.vocab_size)
    vocab = len(tokenizer)
    if vocab > head_rows:
        raise BuildError(f"--tokenizer: {vocab} tokens but the teacher head has only {head_rows} rows; use the "
                         "teacher's own tokenizer")
    if not 1 <= top_k <= vocab:
        raise BuildError(f"--top-k {top_k}: must be between 1 and the vocabulary size ({vocab}); lower --top-k")
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if max_length < 1 or (max_positions is not None and max_length > int(max_positions)):
        raise BuildError(f"--max-length {max_length}: the teacher has {max_positions} positions; use "
                         f"1..{max_positions}")
    layers = int(text_config.num_hidden_layers)
    resolved = []
    for layer in pool_layers:
        if not -(layers + 1) <= layer <= layers:
            raise BuildError(f"--pool-layers {layer}: the teacher has hidden_states 0..{layers}; pick from that range")
        resolved.append(layer % (layers + 1))
    return resolved


def load_teacher(
    teacher: str, tokenizer_src: str | None, *, trust_remote_code: bool, dtype: str, device: torch.device
) -> LoadedTeacher:
    from transformers import AutoModelForCausalLM

    config, tokenizer = load_config_and_tokenizer(teacher, tokenizer_src, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            teacher, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except Exception as err:
        raise BuildError(f"--teacher {teacher}: cannot load the weights ({_one_line(err)}); check the folder") from err
    model.to(device).eval()
    _check_head_reproduced(model, teacher)
    text_config = model.config.get_text_config()
    return LoadedTeacher(
        model=model,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        head_rows=int(model.get_output_embeddings().weight.shape[0]),
        num_layers=int(text_config.num_hidden_layers),
        hidden_size=int(text_config.hidden_size),
        max_positions=getattr(text_config, "max_position_embeddings", None),
        config_hash=schema.stable_hash(config.to_dict()),
        model_type=str(getattr(config, "model_type", "")),
    )


def _final_logit_transform(config: Any):
    """Model-specific logit post-processing the CausalLM head applies after lm_head (softcapping, scaling)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere: multiply
    divide = getattr(config, "logits_scaling", None)  # Granite family: divide

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


@torch.inference_mode()
def topk_targets(
    hidden: torch.Tensor, lm_head: torch.nn.Module, vocab_size: int, top_k: int, transform=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H] final states of N valid tokens -> (ids [N, K] int64, logprobs [N, K] fp32, tail [N] fp32).

    Rows are processed in chunks so only [chunk, V] fp32 logits exist at once; head rows >= vocab_size are sliced
    off before the softmax, so padded rows are never candidates and never take probability mass."""
    n = hidden.shape[0]
    chunk = max(1, _CHUNK_LOGIT_BYTES // (4 * vocab_size))
    ids = torch.empty((n, top_k), dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty((n, top_k), dtype=torch.float32, device=hidden.device)
    tail = torch.empty((n,), dtype=torch.float32, device=hidden.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        logits = lm_head(hidden[lo:hi])[:, :vocab_size].float()
        if transform is not None:
            logits = transform(logits)
        if top_k == vocab_size:  # nothing outside the top-k: the tail is empty
            top_vals, top_ids = torch.topk(logits, top_k, dim=-1, sorted=True)
            total = torch.logsumexp(top_vals, dim=-1)
            rest = torch.full_like(total, float("-inf"))
        else:
            # One pass over [chunk, V] after the top-k: the (k+1)-th logit is the largest one outside the top-k, so
            # shifting by it makes logsumexp over the rest exact and underflow-free (each term <= 1, one term == 1).
            # Summing exp(rest) directly avoids log(1 - sum p), which cancels catastrophically as the top-k mass -> 1.
            vals, top_ids = torch.topk(logits, top_k + 1, dim=-1, sorted=True)
            top_vals, top_ids, shift = vals[:, :top_k], top_ids[:, :top_k], vals[:, top_k : top_k + 1]
            shifted = logits.sub_(shift).exp_()  # in place: top-k entries may overflow to inf, zeroed next
            rest = shifted.scatter_(1, top_ids, 0.0).sum(dim=-1).log_() + shift[:, 0]
            total = torch.logaddexp(rest, torch.logsumexp(top_vals, dim=-1))
            rest = rest - total
        ids[lo:hi] = top_ids
        logprobs[lo:hi] = top_vals - total[:, None]
        tail[lo:hi] = torch.nan_to_num(rest, neginf=schema.TAIL_LOGPROB_FLOOR).clamp_min(schema.TAIL_LOGPROB_FLOOR)
    return ids, logprobs, tail


@torch.inference_mode()
def _check_head_reproduced(model: Any, teacher: str) -> None:
    """The builder computes logits as transform(lm_head(base_model(x))) so that it never holds [B, T, V] at once. A
    model whose CausalLM head post-processes logits in some other way would be cached wrong without any visible
    error, so compare with the model's own forward once, on a few tokens, before building."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(1, 9, device=next(model.parameters()).device)[None, :] % vocab
    reference = model(input_ids=ids, use_cache=False).logits.float()
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    ours = _final_logit_transform(model.config.get_text_config())(model.get_output_embeddings()(hidden).float())
    tolerance = 1e-3 * (1.0 + float(reference.abs().max()))
    if ours.shape != reference.shape or float((ours - reference).abs().max()) > tolerance:
        kind = model.config.model_type
        raise BuildError(f"--teacher {teacher}: its LM head post-processes logits in a way cache_tools does not "
                         f"reproduce (model type {kind!r}); please report it")


@torch.inference_mode()
def teacher_batch(
    teacher: LoadedTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_layers: list[int], top_k: int,
    targets_fn=None,
) -> dict[str, torch.Tensor]:
    """One forward. input_ids/attention_mask [B, T] (right-padded) on the model's device. Returns device tensors:
    topk_ids [B, T, K] (0 on padding), topk_logprobs [B, T, K], tail_logprob [B, T], pooled_hidden [B, P, H] fp32.
    `targets_fn(hidden [N, H], lm_head, vocab_size, transform) -> {field: [N, ...]}` replaces the top-k targets
    (sampled caches); its fields come back as [B, T, ...], zero on padding."""
    model = teacher.model
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                           use_cache=False)
    mask = attention_mask.bool()
    flat = out.last_hidden_state[mask]  # [N, H] valid tokens only: padding never reaches the head
    transform = _final_logit_transform(model.config.get_text_config())
    if targets_fn is None:
        fields = dict(zip((schema.TOPK_IDS, schema.TOPK_LOGPROBS, schema.TAIL_LOGPROB),
                          topk_targets(flat, model.get_output_embeddings(), teacher.vocab_size, top_k, transform),
                          strict=True))
    else:
        fields = targets_fn(flat, model.get_output_embeddings(), teacher.vocab_size, transform)
    full = {}
    for name, values in fields.items():
        full[name] = torch.zeros((*mask.shape, *values.shape[1:]), dtype=values.dtype, device=input_ids.device)
        full[name][mask] = values
    weights = mask.float().unsqueeze(-1)  # [B, T, 1]
    counts = weights.sum(dim=1).clamp_min(1.0)  # [B, 1]
    pooled = torch.stack(
        [(out.hidden_states[layer].float() * weights).sum(dim=1) / counts for layer in pool_layers], dim=1
    )
    return {**full, schema.POOLED_HIDDEN: pooled}
