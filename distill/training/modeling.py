"""`DistillModel`: ONE nn.Module holding the student and its projection heads, computing every loss inside forward.

Why everything happens inside `forward`:
- DeepSpeed wraps one module, so the heads are trained, checkpointed and cast (same dtype as the student) with it.
- Under ZeRO-3 a parameter is gathered only while its owning module runs. The fused CE+KD loss reads the LM-head
  weight directly (it never calls the head, so no `[N, V]` logits exist); we register that weight as an *external
  parameter* of this wrapper, so DeepSpeed gathers it for the duration of this forward (and its backward).
- Evaluation (`model.eval()`) disables autocast inside forward: eval metrics are computed in the student's own dtype
  (fp16 or fp32) with fp32 logits, never in a mixed autocast region (mixing fp16 and fp32 there fails).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cache_tools.format.errors import CacheError, ConfigError
from cache_tools.format.schema import MANIFEST_NAME
from distill.losses import KDConfig, check_kd_for_targets, fused_ce_kd_loss
from distill.losses.aux import PooledProjection, pool_layers
from distill.training.attention import packed_inputs
from distill.training.components import AUX, COMPONENTS, aux_params, wants_aux, weights_of
from distill.training.teachers import multi_teacher_cekd, teacher_fields


@dataclass
class AuxSettings:
    """Which auxiliary losses exist (heads are built only when one has a non-zero base weight)."""

    teacher_hidden: int
    teacher_pool_layers: list[int]  # teacher hidden_states indices (0 = embeddings)
    teacher_num_layers: int
    params: dict[str, dict[str, float]] = field(default_factory=dict)  # {aux component: its parameters}


def map_pool_layers(teacher_layers: list[int], teacher_num_layers: int, student_num_layers: int) -> list[int]:
    """Teacher hidden_states index -> student index at the same relative depth (0 -> 0, last -> last)."""
    return [round(t * student_num_layers / max(teacher_num_layers, 1)) for t in teacher_layers]


def aux_settings(reader: Any, loss_args: Any) -> AuxSettings | None:
    """The teacher's pooling layout from the training cache's manifest, when some aux component has a non-zero base
    weight (else None: no projection heads). `reader` is None in LM-only mode."""
    if reader is None or not wants_aux(weights_of(loss_args)):
        return None
    pooling, teacher = reader.manifest.pooling, reader.manifest.teacher
    return AuxSettings(teacher_hidden=int(pooling.hidden_size), teacher_pool_layers=list(pooling.layers),
                       teacher_num_layers=int(teacher.num_hidden_layers), params=aux_params(loss_args))


def kd_config_for_caches(kd_config: KDConfig, readers: list[Any]) -> KDConfig:
    """`kd_config` for the kind of targets the caches hold ("topk" | "sampled"): the one place the training route
    sets it. CacheError (one line, naming the manifest and the fix) when the caches differ or the KD settings are not
    defined on them: sampled (RS-KD) targets define forward KL only, at the temperature they were drawn at."""
    kinds = {r.manifest.targets.kind for r in readers}
    if len(kinds) > 1:
        raise CacheError(f"{', '.join(str(r.cache_dir) for r in readers)}: training and eval caches hold different "
                         "target kinds (top-k and sampled); evaluate on a cache of the same kind")
    for reader in readers:
        targets = reader.manifest.targets
        problems = check_kd_for_targets(kd_config.for_targets(targets.kind), targets.kind,
                                        float(targets.sample_temperature))
        if problems:
            raise CacheError(f"{reader.cache_dir / MANIFEST_NAME}: {targets.kind} targets: " + "; ".join(problems))
    return kd_config.for_targets(kinds.pop()) if kinds else kd_config


def resolve_pool_layers(requested: list[int] | None, aux: AuxSettings, student_num_layers: int) -> list[int]:
    """The student hidden_states indices to pool: `requested` (--pool_student_layers) or, by default, the teacher's
    pooled layers mapped by relative depth. Raises ConfigError (one line) when they do not fit the cache/student."""
    layers = requested or map_pool_layers(aux.teacher_pool_layers, aux.teacher_num_layers, student_num_layers)
    if len(layers) != len(aux.teacher_pool_layers):
        raise ConfigError(f"--pool_student_layers lists {len(layers)} layer(s), the cache pools "
                          f"{len(aux.teacher_pool_layers)} ({aux.teacher_pool_layers}); give one student layer per "
                          "teacher layer")
    if not all(0 <= i <= student_num_layers for i in layers):
        raise ConfigError(f"--pool_student_layers {','.join(map(str, layers))}: indices must be in "
                          f"[0, {student_num_layers}] (0 = embeddings, {student_num_layers} = the last layer)")
    return layers


def head_rows(student: nn.Module) -> int:
    """Rows of the LM head (under ZeRO-3 the local tensor is an empty partition; `ds_shape` is the full shape)."""
    weight = student.get_output_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


class DistillModel(nn.Module):
    """Student + projection heads. `forward(**batch, loss_weights=...)` returns a dict of losses and metrics.

    Args:
        student: a `*ForCausalLM` model (tied or untied LM head).
        kd_config: settings of the fused CE+KD loss.
        aux: teacher pooling layout; None (or no aux weight) = no projection heads, no hidden_states kept.
        student_pool_layers: student hidden_states indices to pool; default: mapped by relative depth.
    """

    def __init__(self, student: nn.Module, kd_config: KDConfig, aux: AuxSettings | None = None,
                 student_pool_layers: list[int] | None = None, teacher_weights: Sequence[float] = (1.0,),
                 teacher_kd_configs: Sequence[KDConfig] | None = None):
        super().__init__()
        self.student = student
        self.kd_config = kd_config
        # Several teachers (several caches, `distill.training.teachers`): weights summing to 1, one KD config each.
        self.teacher_weights = [float(w) for w in teacher_weights]
        self.teacher_kd_configs = list(teacher_kd_configs or [kd_config] * len(self.teacher_weights))
        self.aux = aux
        self.projection = None
        self.student_pool_layers: list[int] = []
        if aux is not None:
            self.student_pool_layers = resolve_pool_layers(student_pool_layers, aux,
                                                           int(student.config.num_hidden_layers))
            dtype = next(student.parameters()).dtype
            self.projection = PooledProjection(int(student.config.hidden_size), aux.teacher_hidden,
                                               len(self.student_pool_layers)).to(dtype)
        self._register_head_for_zero3()

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def config(self):  # Trainer and DeepSpeed read `model.config` (hidden_size for "auto" buckets, etc.)
        return self.student.config

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Trainer calls this for --activation_checkpointing (--gradient_checkpointing): the student's layers are
        checkpointed, the projection heads are too small to matter."""
        self.student.activation_checkpointing_enable(**kwargs)

    def head_weight(self) -> torch.Tensor:
        """[V, H] LM-head weight (the embedding matrix when tied)."""
        return self.student.get_output_embeddings().weight

    def _register_head_for_zero3(self) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.head_weight())

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the base model (not the LM head). Returns final hidden [B, L, H] and, when projection heads exist,
        the pooled student states [B, P, H] (fp32 masked means of the selected hidden_states). With `segment_ids`
        (isolated packing) no token attends outside its own document (`distill.training.attention`)."""
        base = getattr(self.student, self.student.base_model_prefix)
        want_pool = self.projection is not None
        mask, positions = packed_inputs(attention_mask, position_ids, segment_ids,
                                        base.get_input_embeddings().weight.dtype)
        out = base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   output_hidden_states=want_pool, return_dict=True)
        pooled = pool_layers(out.hidden_states, self.student_pool_layers, attention_mask) if want_pool else None
        return out.last_hidden_state, pooled

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        topk_ids: torch.Tensor | None = None,
        topk_logprobs: torch.Tensor | None = None,
        tail_logprob: torch.Tensor | None = None,
        kd_mask: torch.Tensor | None = None,
        pooled_hidden: torch.Tensor | None = None,
        loss_weights: dict[str, float] | None = None,
        ce_denominator: torch.Tensor | None = None,
        kd_denominator: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **more_teachers: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Shapes: input_ids/attention_mask/labels [B, L]; topk_* [B, L, K]; tail_logprob/kd_mask [B, L];
        pooled_hidden [B, P, H_teacher]; position_ids/segment_ids [B, L] (isolated packing, from the collator).
        Without teacher keys (LM-only) only CE is computed.

        ce_denominator / kd_denominator: divide the summed CE / KD by these (global counts over gradient
        accumulation and ranks, from the trainer) instead of this micro-batch's own counts.

        Returns {"loss": differentiable weighted total, "cekd_loss" / "aux_loss": its two parts, one raw detached
        loss per registered component (`distill.training.components`: "ce", "kd", "feature", ...), "n_ce", "n_kd",
        "n_aux": row / sequence counts (0 = not computed), "top1_agree", "covered_mass"} (all 0-dim tensors). In
        training, a KD weight of 0 skips KD entirely (n_kd = 0); the aux losses are computed only when some aux
        weight is non-zero. Several teachers: `more_teachers` holds teacher t >= 1's fields under `teacher_key`;
        "kd" is then the weighted mixture and each teacher's metrics come under `teachers.teacher_tag`."""
        weights = {c.name: 1.0 if c.name == "ce" else 0.0 for c in COMPONENTS}
        weights.update(loss_weights or {})
        no_autocast = contextlib.nullcontext() if self.training else torch.autocast(input_ids.device.type,
                                                                                    enabled=False)
        with no_autocast:
            hidden, pooled = self.encode(input_ids, attention_mask, position_ids, segment_ids)
            H = hidden.shape[-1]
            flat_labels = labels.reshape(-1)
            # Training with a zero KD weight IS LM-only training: the same call as without a cache, bit for bit (and
            # no KD work). Evaluation always measures KD when targets exist.
            lm_only = topk_ids is None or (self.training and weights["kd"] == 0)
            if lm_only:
                # One empty KD slot per row, masked out, so the same fused kernel computes CE alone.
                n = flat_labels.shape[0]
                topk_ids = torch.full((n, 1), -1, dtype=torch.long, device=hidden.device)
                topk_logprobs = torch.zeros((n, 1), dtype=torch.float32, device=hidden.device)
                tail_logprob = torch.zeros((n,), dtype=torch.float32, device=hidden.device)
                kd_mask = torch.zeros((n,), dtype=torch.bool, device=hidden.device)
                weights["kd"] = 0.0
            if len(self.teacher_weights) > 1 and not lm_only:
                first = dict(topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprob=tail_logprob,
                             kd_mask=kd_mask, kd_denominator=kd_denominator)
                teachers = [first] + [teacher_fields(more_teachers, t) for t in range(1, len(self.teacher_weights))]
                cekd = multi_teacher_cekd(hidden.reshape(-1, H), self.head_weight(), flat_labels, teachers,
                                          weights=weights, teacher_weights=self.teacher_weights,
                                          kd_configs=self.teacher_kd_configs, ce_denominator=ce_denominator)
            else:
                cekd = self._single_teacher(hidden.reshape(-1, H), flat_labels, topk_ids, topk_logprobs, tail_logprob,
                                            kd_mask, weights, ce_denominator, kd_denominator)
            aux_total, raw, n_aux = self._aux_terms(pooled, pooled_hidden, weights, cekd["cekd_loss"])
        total = cekd["cekd_loss"] + aux_total
        return {"loss": total, "aux_loss": aux_total, **cekd, **raw,
                "n_aux": torch.tensor(n_aux, device=total.device)}

    def _single_teacher(self, hidden: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                        topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, kd_mask: torch.Tensor,
                        weights: dict[str, float], ce_denominator: torch.Tensor | None,
                        kd_denominator: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The fused CE + KD of one teacher over hidden [N, H]; the forward's CE/KD keys."""
        K = topk_ids.shape[-1]
        out = fused_ce_kd_loss(
            hidden, self.head_weight(), labels,
            topk_ids.reshape(-1, K), topk_logprobs.reshape(-1, K).float(), tail_logprob.reshape(-1).float(),
            kd_mask.reshape(-1), ce_weight=float(weights["ce"]), kd_weight=float(weights["kd"]),
            config=self.kd_config, ce_denominator=ce_denominator, kd_denominator=kd_denominator,
        )
        return {"cekd_loss": out.loss, "ce": out.ce, "kd": out.kd,
                "n_ce": torch.tensor(out.n_ce, device=out.loss.device),
                "n_kd": torch.tensor(out.n_kd, device=out.loss.device),
                "top1_agree": out.top1_agree, "covered_mass": out.covered_mass}

    def _aux_terms(self, pooled: torch.Tensor | None, pooled_hidden: torch.Tensor | None, weights: dict[str, float],
                   like: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(weighted aux total, raw detached value per aux component, sequences counted); zeros (on `like`'s
        device) unless projection heads exist, the batch has teacher pooled states and some aux weight is set."""
        aux_total = like.new_zeros(())
        if self.projection is None or pooled_hidden is None or not wants_aux(weights):
            return aux_total, {c.name: aux_total for c in AUX}, 0
        losses = self._aux_losses(pooled, pooled_hidden)
        for name, value in losses.items():
            aux_total = aux_total + weights[name] * value
        return aux_total, {name: value.detach() for name, value in losses.items()}, int(pooled_hidden.shape[0])

    def _aux_losses(self, student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, P, H_s] (fp32) and [B, P, H_t] -> {aux component: scalar}, computed in fp32 (bounded losses). Every
        aux component is computed (its raw value is logged even at weight 0, once the heads exist)."""
        with torch.autocast(student_pooled.device.type, enabled=False):  # fp32 under AMP too (bounded losses)
            projected = self.projection(student_pooled)  # [B, P, H_t] fp32 whatever the heads' storage dtype
            teacher = teacher_pooled.float()
            return {c.name: c.compute(projected, teacher, **self.aux.params.get(c.name, {})) for c in AUX}

