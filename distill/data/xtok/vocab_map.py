"""Teacher id -> student id map, built once per tokenizer pair and saved beside the cache.

Exact twins (same byte string) map directly. For the rest, the rule decides: `first_token` credits the student token
that begins the teacher token's text; `tail` leaves them unmapped, so `map_topk` moves their mass into the tail bucket.
Special tokens map only to special tokens (teacher EOS -> student EOS, others by identical content), never by bytes:
"<|endoftext|>" must not become the student's "<".
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache_tools.format import schema
from cache_tools.format.errors import TokenizerError
from cache_tools.format.fsutil import atomic_path, file_sha256
from distill.data.xtok import token_bytes
from distill.data.xtok.token_bytes import TokenBytes, plain_backend, tokenizer_label

log = logging.getLogger(__name__)

RULES = ("first_token", "tail")


def map_fingerprint() -> str:
    """16 hex digits naming everything that decides a map besides the two tokenizers and the rule: the source of
    this module and of `token_bytes` (byte decoding, special-token handling) and the `tokenizers` version (its
    encoder runs the first_token rule). Saved maps carry it in their name and contents, so a map built by other
    code is rebuilt, never reused silently; nobody has to remember to bump a version number."""
    import tokenizers

    digest = hashlib.sha256()
    for source in (__file__, token_bytes.__file__):
        digest.update(file_sha256(source).encode())
    digest.update(tokenizers.__version__.encode())
    return digest.hexdigest()[:16]


MAP_VERSION = map_fingerprint()


@dataclass
class VocabMap:
    """ids: int64 [V_teacher] student id or -1; exact: bool [V_teacher] the id came from an exact byte match."""

    ids: np.ndarray
    exact: np.ndarray
    rule: str
    teacher_hash: str
    student_hash: str

    @property
    def num_mapped(self) -> int:
        return int((self.ids >= 0).sum())

    @property
    def num_exact(self) -> int:
        return int(self.exact.sum())


def special_pairs(teacher_tok: Any, student_tok: Any, teacher: TokenBytes, student: TokenBytes) -> dict[int, int]:
    """teacher special id -> student special id (or -1 when the student has no counterpart)."""
    student_by_content = {student.tokens[i]: i for i in student.special_ids if i < student.size}
    pairs: dict[int, int] = {}
    for role in ("eos", "bos", "pad", "unk"):
        t_id = getattr(teacher_tok, f"{role}_token_id", None)
        s_id = getattr(student_tok, f"{role}_token_id", None)
        if t_id is not None and s_id is not None:
            pairs.setdefault(int(t_id), int(s_id))
    for t_id in teacher.special_ids:
        if t_id < teacher.size:
            pairs.setdefault(t_id, student_by_content.get(teacher.tokens[t_id], -1))
    return pairs


def build_vocab_map(teacher_tok: Any, student_tok: Any, teacher: TokenBytes, student: TokenBytes, rule: str,
                    teacher_hash: str, student_hash: str) -> VocabMap:
    """Exact byte matches first, then the non-exact rule. Cost: one dict lookup per teacher token, plus (first_token)
    one batched student encode of the non-exact tokens."""
    if rule not in RULES:
        raise ValueError(f"--xtok-rule {rule!r}: unknown; choose one of {', '.join(RULES)}")
    # Student specials are not text: a teacher's ordinary token must never land on one by its bytes.
    by_bytes = {b: i for i, b in enumerate(student.tokens) if b and i not in student.special_ids}
    ids = np.fromiter((by_bytes.get(b, -1) if b else -1 for b in teacher.tokens), dtype=np.int64, count=teacher.size)
    specials = np.fromiter(teacher.special_ids, dtype=np.int64)
    ids[specials[specials < teacher.size]] = -1
    exact = ids >= 0
    for t_id, s_id in special_pairs(teacher_tok, student_tok, teacher, student).items():
        if t_id < teacher.size:
            ids[t_id] = s_id
            exact[t_id] = s_id >= 0
    if rule == "first_token":
        _fill_first_token(ids, student_tok, teacher, student, by_bytes)
    return VocabMap(ids, exact, rule, teacher_hash, student_hash)


def _fill_first_token(ids: np.ndarray, student_tok: Any, teacher: TokenBytes, student: TokenBytes,
                      by_bytes: dict[bytes, int]) -> None:
    """For unmapped ordinary teacher tokens: first token of the student's encoding of the token's text, accepted only
    when its bytes really begin the teacher token (a normaliser or a dummy prefix could break that); otherwise, and for
    partial-UTF-8 byte tokens that have no text, the longest student token that is a byte prefix."""
    todo = [i for i in np.flatnonzero(ids < 0).tolist() if teacher.tokens[i] and i not in teacher.special_ids]
    texts: list[str] = []
    decodable: list[int] = []
    for i in todo:
        try:
            texts.append(teacher.tokens[i].decode("utf-8"))
            decodable.append(i)
        except UnicodeDecodeError:
            pass
    if texts:
        encodings = plain_backend(student_tok).encode_batch(texts, add_special_tokens=False)
        for i, enc in zip(decodable, encodings, strict=True):
            if enc.ids:
                first = enc.ids[0]
                piece = student.tokens[first] if first < student.size else b""
                if piece and first not in student.special_ids and teacher.tokens[i].startswith(piece):
                    ids[i] = first
    for i in todo:
        if ids[i] < 0:
            data = teacher.tokens[i]
            for cut in range(len(data), 0, -1):
                hit = by_bytes.get(data[:cut])
                if hit is not None:
                    ids[i] = hit
                    break


def map_path(cache_dir: str | os.PathLike, teacher_hash: str, student_hash: str, rule: str) -> Path:
    """`DIR/vocab_maps/<teacher16>-<student16>-<code fingerprint>-<rule>.npz`."""
    name = f"{teacher_hash[:16]}-{student_hash[:16]}-{MAP_VERSION}-{rule}.npz"
    return Path(cache_dir) / schema.VOCAB_MAP_DIR / name


def user_map_path(teacher_hash: str, student_hash: str, rule: str) -> Path:
    """Fallback location when the cache directory is read-only."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill"
    return map_path(root, teacher_hash, student_hash, rule)


def save_vocab_map(vmap: VocabMap, path: Path) -> None:
    """temp + rename: a concurrent reader (another rank) sees no file or a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=vmap.ids, exact=vmap.exact, rule=np.str_(vmap.rule), version=np.str_(MAP_VERSION),
                 teacher_hash=np.str_(vmap.teacher_hash), student_hash=np.str_(vmap.student_hash))


def load_vocab_map(path: Path, teacher_hash: str, student_hash: str, rule: str) -> VocabMap | None:
    """The saved map, or None when absent, unreadable or for another pair (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = (str(data["teacher_hash"]), str(data["student_hash"]), str(data["rule"]), str(data["version"]))
            if meta != (teacher_hash, student_hash, rule, MAP_VERSION):
                return None
            return VocabMap(data["ids"].astype(np.int64), data["exact"].astype(bool), rule, teacher_hash, student_hash)
    except (OSError, ValueError, KeyError) as err:
        log.warning("%s: unreadable vocabulary map (%s); rebuilding it", path, err)
        return None


def load_or_build_vocab_map(cache_dir: str | os.PathLike | None, teacher_tok: Any, student_tok: Any,
                            teacher: TokenBytes, student: TokenBytes, rule: str, teacher_hash: str,
                            student_hash: str) -> tuple[VocabMap, Path | None]:
    """Reuse `DIR/vocab_maps/<t16>-<s16>-<fingerprint>-<rule>.npz` (or the user-cache copy); build and save it
    otherwise."""
    candidates = [user_map_path(teacher_hash, student_hash, rule)]
    if cache_dir is not None:
        candidates.insert(0, map_path(cache_dir, teacher_hash, student_hash, rule))
    for path in candidates:
        vmap = load_vocab_map(path, teacher_hash, student_hash, rule)
        if vmap is not None and vmap.ids.shape[0] == teacher.size:
            return vmap, path
    vmap = build_vocab_map(teacher_tok, student_tok, teacher, student, rule, teacher_hash, student_hash)
    for path in candidates:
        try:
            save_vocab_map(vmap, path)
            log.info("vocabulary map %s -> %s (%s): %d/%d teacher tokens mapped (%d exact); saved to %s",
                     tokenizer_label(teacher_tok), tokenizer_label(student_tok), rule, vmap.num_mapped,
                     teacher.size, vmap.num_exact, path)
            return vmap, path
        except OSError as err:
            log.warning("%s: cannot write vocabulary map (%s); trying the next location", path, err)
    log.warning("vocabulary map not saved anywhere; it will be rebuilt next run")
    return vmap, None


def require_student_eos(student_tok: Any, pairs: dict[int, int], teacher_eos: int | None) -> int:
    """The student's EOS separates the cache's packed documents; without one the windows cannot be re-tokenised."""
    s_eos = getattr(student_tok, "eos_token_id", None)
    if teacher_eos is not None:
        s_eos = pairs.get(int(teacher_eos), s_eos)
    if s_eos is None or s_eos < 0:
        raise TokenizerError(
            f"student tokenizer {tokenizer_label(student_tok)!r} has no EOS token to separate the cache's packed "
            "documents; set eos_token in its tokenizer_config.json (e.g. tokenizer.eos_token = '</s>')"
        )
    return int(s_eos)
