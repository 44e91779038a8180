"""`CrossTokenizerTargets`: the target builder for a student whose tokenizer differs from the cache's.

Per cached window (in DataLoader workers): re-tokenise the text with the student (split on the teacher's special
tokens, the student's own specials inserted), align positions by consumed text, map the aligned teacher top-k rows
onto student ids. CE applies at every student position, KD only where `kd_mask` is set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema
from cache_tools.format.errors import TokenizerError
from cache_tools.format.reader import CachedSequence, TeacherCacheReader
from distill.data.chat import is_conversational
from distill.data.validation import SequenceValidator, check_mapped
from distill.data.xtok.align import (
    align,
    char_to_byte_table,
    consumed_ends,
    encode_student,
    split_segments,
    student_consumed,
)
from distill.data.xtok.documents import blank_example, cut_pieces, document_starts, next_is_assistant, student_segments
from distill.data.xtok.store import STAT_KEYS, TargetStore, open_store, store_key
from distill.data.xtok.token_bytes import plain_backend, token_bytes_table, tokenizer_label
from distill.data.xtok.topk_map import TopKMapper
from distill.data.xtok.vocab_map import load_or_build_vocab_map, require_student_eos, special_pairs

log = logging.getLogger(__name__)

__all__ = ["STAT_KEYS", "CrossTokenizerTargets", "aggregate_stats", "load_teacher_tokenizer", "load_tokenizer",
           "tokenizer_from_flag"]


def load_tokenizer(spec: Any, role: str) -> Any:
    """A tokenizer object as is, or AutoTokenizer from a path/hub id (remote code never runs here)."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    return _auto_tokenizer(str(spec), f"{role} tokenizer {str(spec)!r}")


def tokenizer_from_flag(flag: str, spec: str) -> Any:
    """The tokenizer a command-line flag names; TokenizerError (one line naming the flag) when it cannot load."""
    return _auto_tokenizer(spec, f"{flag} {spec}")


def _auto_tokenizer(spec: str, named: str) -> Any:
    """AutoTokenizer from a path/hub id; a failure is one TokenizerError line that starts with `named`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        local = "" if os.path.exists(spec) else "no local folder by that name and "
        raise TokenizerError(f"{named}: cannot load it ({local}{str(err).splitlines()[0]}); pass a folder "
                             "with tokenizer.json or a hub id") from err


def load_teacher_tokenizer(cache_dir: str | os.PathLike, manifest: schema.CacheManifest) -> Any:
    """The cache's tokenizer: `DIR/tokenizer/` if the builder saved one, else the manifest's name_or_path."""
    local = Path(cache_dir) / schema.TOKENIZER_DIR
    spec = local if local.is_dir() else manifest.tokenizer.name_or_path
    if not spec:
        raise TokenizerError(f"{Path(cache_dir) / schema.MANIFEST_NAME}: no teacher tokenizer recorded; pass the "
                             "teacher tokenizer explicitly")
    return load_tokenizer(spec, "teacher")


class CrossTokenizerTargets:
    """Callable `CachedSequence -> per-example dict` (see docs/ARCHITECTURE.md) plus "stats".

    Args:
        reader_or_manifest: a TeacherCacheReader (its cache_dir is used) or a CacheManifest (pass cache_dir).
        teacher_tokenizer: the cache's tokenizer (object or path); None loads it from the cache / manifest.
        student_tokenizer: the student's tokenizer (object or path).
        rule: "first_token" or "tail" for teacher tokens without an exact student twin.
        cache_dir: where `vocab_maps/` lives (defaults to the reader's directory).
        max_length: student tokens kept per window (default: the cache's window length, `manifest.max_length`, so
            a student whose tokenizer splits the text finer never gets longer sequences than the teacher saw; 0 keeps
            them all). The cut is at the end: every kept position keeps its target; the rest is counted in stats.
        validate: check each sequence (ids in range, finite log-probs; `distill.data.validation`) before mapping.
        use_store: read targets precomputed by `python -m distill.prepare_xtok` (`CACHE/xtok/<key>/`, see
            `distill.data.xtok.store`) in `fetch` when they exist for exactly this setup; else compute on the fly.
    """

    def __init__(self, reader_or_manifest: TeacherCacheReader | schema.CacheManifest, teacher_tokenizer: Any = None,
                 student_tokenizer: Any = None, *, rule: str = "first_token",
                 cache_dir: str | os.PathLike | None = None, max_length: int | None = None,
                 validate: bool = True, use_store: bool = True, isolated: bool = False,
                 assistant_only: bool = False, chat_template: str | None = None) -> None:
        if isinstance(reader_or_manifest, TeacherCacheReader):
            manifest = reader_or_manifest.manifest
            cache_dir = cache_dir if cache_dir is not None else reader_or_manifest.cache_dir
        else:
            manifest = reader_or_manifest
        if student_tokenizer is None:
            raise TokenizerError("CrossTokenizerTargets needs the student tokenizer (--student)")
        if teacher_tokenizer is None:
            if cache_dir is None:
                raise TokenizerError("CrossTokenizerTargets: pass the teacher tokenizer or the cache directory")
            teacher_tokenizer = load_teacher_tokenizer(cache_dir, manifest)
        self.teacher_tok = load_tokenizer(teacher_tokenizer, "teacher")
        self.student_tok = load_tokenizer(student_tokenizer, "student")
        where = Path(cache_dir) / schema.MANIFEST_NAME if cache_dir is not None else "the cache manifest"
        self.teacher_hash = schema.tokenizer_hash(self.teacher_tok)
        if self.teacher_hash != manifest.tokenizer_hash:
            raise TokenizerError(
                f"{where}: teacher tokenizer {tokenizer_label(self.teacher_tok)!r} is not the one the cache was built "
                f"with ({manifest.tokenizer.name_or_path!r}); pass the cache's own tokenizer"
            )
        self.student_hash = schema.tokenizer_hash(self.student_tok)
        self.teacher_bytes = token_bytes_table(self.teacher_tok, "teacher")
        self.student_bytes = token_bytes_table(self.student_tok, "student")
        self.rule = rule
        self.vocab_map, self.map_path = load_or_build_vocab_map(
            cache_dir, self.teacher_tok, self.student_tok, self.teacher_bytes, self.student_bytes, rule,
            self.teacher_hash, self.student_hash)
        self.specials = special_pairs(self.teacher_tok, self.student_tok, self.teacher_bytes, self.student_bytes)
        teacher_eos = manifest.tokenizer.special_ids.get("eos", self.teacher_tok.eos_token_id)
        self.student_eos = require_student_eos(self.student_tok, self.specials, teacher_eos)
        if teacher_eos is not None:
            self.specials[int(teacher_eos)] = self.student_eos
        missing = sorted(self.teacher_bytes.tokens[t].decode("utf-8", "replace")
                         for t, s in self.specials.items() if s < 0 and t < self.teacher_bytes.size)
        if missing:
            log.warning("student tokenizer %s lacks the teacher's special tokens %s: their text is tokenised as "
                        "ordinary text and their probability goes to the tail", tokenizer_label(self.student_tok),
                        missing[:8])
        self.renderer = None
        if is_conversational(manifest):
            # The student re-renders each conversation with its own template; the markup it adds (a default system
            # turn, other headers) would push assistant content past a cut at the teacher's window length.
            from distill.data.xtok.chat import StudentRenderer, load_template

            self.renderer = StudentRenderer(self.student_tok, load_template(chat_template, self.student_tok))
            max_length = 0 if max_length is None else max_length
        if max_length is None:
            max_length = manifest.max_length
        self.max_length = int(max_length) if max_length else None
        self.slots = manifest.slots
        self._mapper = TopKMapper(self.vocab_map.ids, self.vocab_map.exact)
        self._validator = SequenceValidator(manifest, cache_dir) if validate else None
        self._student_rows = self.student_bytes.size
        self._teacher_norm = _normalizer(self.teacher_tok)
        self._student_norm = _normalizer(self.student_tok)
        self._student_backend = plain_backend(self.student_tok)
        self._skips = 0
        self.isolated = isolated
        self.assistant_only = assistant_only
        self.chat_template = chat_template
        self.store_meta = store_key(self.teacher_hash, self.student_hash, rule, self.max_length, self.slots,
                                    isolated=isolated, assistant_only=assistant_only,
                                    chat_template=self.renderer.template if self.renderer is not None else "")
        self.store: TargetStore | None = None
        if use_store and cache_dir is not None:
            spec = student_tokenizer if isinstance(student_tokenizer, (str, os.PathLike)) else tokenizer_label(
                self.student_tok)
            hint = (f"python -m distill.prepare_xtok {cache_dir} --student-tokenizer {spec} --xtok-rule {rule} "
                    f"--max-length {self.max_length or 0}"
                    + (f" --student-chat-template {chat_template}" if chat_template else "")
                    + ("" if assistant_only or self.renderer is None else " --assistant-only-loss false"))
            self.store = open_store(cache_dir, manifest, self.store_meta, self._check_stored, hint)

    def fetch(self, reader: TeacherCacheReader, index: int) -> dict[str, Any]:
        """The example for global sequence `index`: read from the precomputed store when it holds it (no cache
        read, no mapping), else `self(reader[index])`. Both give the same bytes (tests/test_xtok_store.py)."""
        out = self.store.get(index) if self.store is not None else None
        return out if out is not None else self(reader[index])

    @property
    def student_rows(self) -> int:
        """Rows of the student's token table: mapped ids lie in [0, student_rows)."""
        return self._student_rows

    def _check_stored(self, out: dict[str, Any]) -> str | None:
        ids = out["input_ids"]
        if ids.size and not (int(ids.min()) >= 0 and int(ids.max()) < self._student_rows):
            return "holds student input ids out of range"
        if not np.isfinite(out["pooled_hidden"]).all():
            return "holds NaN/Inf pooled hidden states"
        return check_mapped(out, self._student_rows)

    def __call__(self, seq: CachedSequence) -> dict[str, Any]:
        if self._validator is not None:
            self._validator(seq)
        if self.renderer is not None and getattr(seq, "conversation", None) is not None:
            from distill.data.xtok.chat_targets import chat_example

            out = chat_example(self, seq)
            problem = check_mapped(out, self._student_rows) if self._validator is not None else None
            if problem:
                self._validator.fail(seq.index, problem)
            return out
        text = seq.text
        text_bytes = text.encode("utf-8")
        c2b = char_to_byte_table(text)
        pieces = split_segments(seq.input_ids, seq.offsets, self.specials, len(text))
        doc_starts = document_starts(seq, len(text)) if self.isolated else None
        if doc_starts is not None:
            pieces = cut_pieces(pieces, doc_starts)  # the student tokenises each document alone, as the teacher did
        window = encode_student(self._student_backend, text, pieces)
        s_cons = student_consumed(window, pieces, text, c2b, self.student_bytes, self._student_norm)
        t_cons = consumed_ends(seq.input_ids, seq.offsets, text, text_bytes, c2b, self.teacher_bytes,
                               self._teacher_norm)
        n = window.ids.shape[0] if self.max_length is None else min(window.ids.shape[0], self.max_length)
        out = blank_example(window.ids[:n], seq.topk_ids.shape[1], seq.pooled_hidden)
        stats = out["stats"]
        stats["truncated"] = int(window.ids.shape[0] - n)
        if self.isolated:
            out["segment_lengths"] = (student_segments(window.offsets[:n, 0], doc_starts) if doc_starts is not None
                                      else np.array([n], dtype=np.int32))
        label_mask = None
        if self.assistant_only and getattr(seq, "assistant_mask", None) is not None:
            label_mask = next_is_assistant(seq, window.offsets[:n])
            out["label_mask"] = label_mask
        if not t_cons.matches_text:
            # The cached tokens do not spell the cached text: any alignment would be a wrong target. CE still holds.
            self._skips += 1
            stats["skipped"] = 1
            if self._skips <= 3 or self._skips % 1000 == 0:
                log.warning("cache sequence %d: teacher tokens do not reproduce the cached text; KD skipped for "
                            "this window (%d so far)", seq.index, self._skips)
            return out
        teacher_pos = align(t_cons, s_cons)[:n]
        target_mask = getattr(seq, "target_mask", None)
        if target_mask is not None:  # teacher positions without stored targets give no KD
            teacher_pos[teacher_pos >= 0] = np.where(target_mask[teacher_pos[teacher_pos >= 0]],
                                                     teacher_pos[teacher_pos >= 0], -1)
        if label_mask is not None:
            teacher_pos[~label_mask] = -1
            stats["assistant_tokens"] = int(label_mask.sum())
        aligned = np.flatnonzero(teacher_pos >= 0)
        rows = teacher_pos[aligned]
        mapped = self._mapper(seq.topk_ids[rows], seq.topk_logprobs[rows], seq.tail_logprob[rows])
        out["topk_ids"][aligned] = mapped.ids
        out["topk_logprobs"][aligned] = mapped.logprobs
        out["tail_logprob"][aligned] = mapped.tail
        out["kd_mask"][aligned] = True
        stats.update(aligned=int(aligned.shape[0]), teacher_mass=mapped.teacher_mass,
                     mapped_mass=mapped.mapped_mass, exact_mass=mapped.exact_mass,
                     assistant_aligned=int(aligned.shape[0]) if label_mask is not None else 0)
        if self._validator is not None:
            problem = check_mapped(out, self._student_rows)
            if problem:
                self._validator.fail(seq.index, problem)
        return out


def _normalizer(tokenizer: Any) -> Any:
    norm = tokenizer.backend_tokenizer.normalizer
    return norm.normalize_str if norm is not None else None


def aggregate_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Sum per-example stats and add the two ratios worth plotting: `xtok/aligned_fraction` (student positions with
    a KD target) and `xtok/mapped_mass_fraction` (teacher top-k mass landing on student ids)."""
    total = {key: float(sum(s.get(key, 0) for s in stats)) for key in STAT_KEYS}
    total["aligned_fraction"] = total["aligned"] / total["student_tokens"] if total["student_tokens"] else 0.0
    total["mapped_mass_fraction"] = total["mapped_mass"] / total["teacher_mass"] if total["teacher_mass"] else 0.0
    total["exact_mass_fraction"] = total["exact_mass"] / total["teacher_mass"] if total["teacher_mass"] else 0.0
    total["assistant_aligned_fraction"] = (total["assistant_aligned"] / total["assistant_tokens"]
                                           if total["assistant_tokens"] else 0.0)
    return total
