"""The teacher side of a build: load model + tokenizer with up-front checks, and turn one padded batch into cache
targets (top-k over the TRUE vocabulary, exact tail mass, pooled hidden states) without ever materialising
[batch, seq, vocab] logits in fp32."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from cache_tools.format import schema
from cache_tools.format.errors import BuildError, NonFiniteLogits, UserError, one_line  # noqa: F401
from cache_tools.format.packing import isolated_attention
from cache_tools.head import sampled_targets, topk_targets
from cache_tools.sampling import sample_targets, sequence_uniforms  # noqa: F401 - re-exported

DTYPES = {name: getattr(torch, torch_name) for name, torch_name in schema.DTYPE_NAMES.items()}
# Key of the sampled counts in `teacher_batch`'s result (format v2 may map it to a schema dataset name).
SAMPLE_COUNTS = schema.SAMPLE_COUNTS



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
        if not path.exists():  # "Check your internet connection" misleads when a local folder was meant
            raise BuildError(f"--teacher {teacher}: no local folder by that name, and it is not a hub model this "
                             f"machine can load ({one_line(err)}); check the path or the hub id") from err
        raise BuildError(f"--teacher {teacher}: cannot load the config ({one_line(err)}); pass a model folder or "
                         "hub id (custom code needs --trust-remote-code)") from err
    src = tokenizer_src or teacher
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as err:
        flag = "--tokenizer" if tokenizer_src else "--teacher"
        raise BuildError(f"{flag} {src}: cannot load the tokenizer ({one_line(err)}); pass --tokenizer") from err
    return config, tokenizer


def check_settings(config: Any, tokenizer: Any, *, max_length: int, pool_layers: list[int]) -> list[int]:
    """Validate the flags against the teacher; returns pool layers as non-negative hidden_states indices."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_rows = int(text_config.vocab_size)
    vocab = len(tokenizer)
    if vocab > head_rows:
        raise BuildError(f"--tokenizer: {vocab} tokens but the teacher head has only {head_rows} rows; use the "
                         "teacher's own tokenizer")
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
        raise BuildError(f"--teacher {teacher}: cannot load the weights ({one_line(err)}); check the folder") from err
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


def check_finite(bad_tokens: torch.Tensor, token_rows: torch.Tensor, first_sequence: int, what: str) -> None:
    """Stop the build at once when a teacher output of this batch is NaN/inf, before anything of it is written.

    bad_tokens [N] bool over the batch's valid tokens, token_rows [N] = each token's row in the batch, first_sequence
    = global index of row 0. One device->host sync per batch: the price of never writing a cache that the reader
    would refuse only at training time (fp16 teachers of the Qwen family overflow)."""
    if bool(bad_tokens.any()):
        _stop_non_finite(token_rows[bad_tokens].unique().tolist(), first_sequence, what)


def _stop_non_finite(rows: list[int], first_sequence: int, what: str) -> NoReturn:
    raise BuildError(f"teacher {what} are not finite (NaN/inf) in sequence {first_sequence + rows[0]} (global index; "
                     f"{len(rows)} sequence(s) of this batch); nothing from this batch was written. An fp16 teacher "
                     "overflows: rebuild with --dtype bf16 (GPUs with bf16) or --dtype fp32, plus --overwrite (the "
                     "dtype is a cache setting); in fp32 already, check the model's weights")


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


@dataclass(frozen=True)
class Sampling:
    """Sampled targets for `teacher_batch`: uniforms [B, T, S] float64 (row i from `sequence_uniforms` of the
    batch's i-th sequence, any values on padding) and the temperature the S draws are taken at."""

    uniforms: torch.Tensor
    temperature: float = 1.0


@torch.inference_mode()
def teacher_batch(
    teacher: LoadedTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_layers: list[int], top_k: int,
    *, first_sequence: int = 0, sampling: Sampling | None = None, segments: list | None = None,
) -> dict[str, torch.Tensor]:
    """One forward. input_ids/attention_mask [B, T] (right-padded) on the model's device; first_sequence = global
    index of row 0 (named when an output is not finite). Returns device tensors: pooled_hidden [B, P, H] fp32 and
    top-k: topk_ids [B, T, K] (0 on padding), topk_logprobs [B, T, K], tail_logprob [B, T]; or with `sampling`:
    SAMPLE_IDS [B, T, S] distinct sampled ids (-1 padded, -1 on padding) and SAMPLE_COUNTS [B, T, S] int32 (`top_k`
    is unused then).
    `segments` (per row, the lengths of its packed pieces): each piece is run as if alone (isolated packing)."""
    model = teacher.model
    extra: dict[str, torch.Tensor] = {"attention_mask": attention_mask}
    if segments is not None:
        dtype = next(model.parameters()).dtype
        mask4d, positions = isolated_attention(segments, input_ids.shape[1], dtype, input_ids.device)
        extra = {"attention_mask": mask4d, "position_ids": positions}
    out = model.base_model(input_ids=input_ids, output_hidden_states=True, use_cache=False, **extra)
    mask = attention_mask.bool()
    flat = out.last_hidden_state[mask]  # [N, H] valid tokens only: padding never reaches the head
    weights = mask.float().unsqueeze(-1)  # [B, T, 1]
    counts = weights.sum(dim=1).clamp_min(1.0)  # [B, 1]
    pooled = torch.stack(
        [(out.hidden_states[layer].float() * weights).sum(dim=1) / counts for layer in pool_layers], dim=1
    )
    # The last layer is checked per token, pooled layers per sequence (a masked sum keeps any NaN/inf of its tokens).
    token_rows = torch.nonzero(mask)[:, 0]  # [N] batch row of each valid token
    bad = ~torch.isfinite(flat).all(-1) | ~torch.isfinite(pooled).flatten(1).all(-1)[token_rows]
    check_finite(bad, token_rows, first_sequence, "hidden states")
    transform = _final_logit_transform(model.config.get_text_config())
    head, B, T = model.get_output_embeddings(), *input_ids.shape
    if sampling is not None:
        try:
            uniforms = sampling.uniforms.to(mask.device)[mask]  # [N, S]
            ids, sample_counts = sampled_targets(flat, head, teacher.vocab_size, uniforms, sampling.temperature,
                                                 transform)
        except NonFiniteLogits as err:
            _stop_non_finite(token_rows[err.rows].unique().tolist(), first_sequence, "logits")
        num_samples = sampling.uniforms.shape[-1]
        full_ids = torch.full((B, T, num_samples), -1, dtype=torch.int64, device=input_ids.device)
        full_counts = torch.zeros((B, T, num_samples), dtype=torch.int32, device=input_ids.device)
        full_ids[mask], full_counts[mask] = ids, sample_counts
        return {schema.SAMPLE_IDS: full_ids, SAMPLE_COUNTS: full_counts, schema.POOLED_HIDDEN: pooled}
    ids, logprobs, tail = topk_targets(flat, head, teacher.vocab_size, top_k, transform)
    check_finite(torch.isnan(logprobs).any(-1) | torch.isnan(tail), token_rows, first_sequence, "logits")
    full_ids = torch.zeros((B, T, top_k), dtype=torch.int64, device=input_ids.device)
    full_lp = torch.zeros((B, T, top_k), dtype=torch.float32, device=input_ids.device)
    full_tail = torch.zeros((B, T), dtype=torch.float32, device=input_ids.device)
    full_ids[mask], full_lp[mask], full_tail[mask] = ids, logprobs, tail
    return {schema.TOPK_IDS: full_ids, schema.TOPK_LOGPROBS: full_lp, schema.TAIL_LOGPROB: full_tail,
            schema.POOLED_HIDDEN: pooled}
