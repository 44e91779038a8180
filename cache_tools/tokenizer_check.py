"""`build-cache --tokenizer OTHER`: the teacher must be fed ids of the vocabulary it was trained on. A tokenizer of
another model gives ids the teacher reads as other tokens, and the cache then holds confident nonsense with no error
anywhere downstream. So a `--tokenizer` other than the teacher's own is checked against the teacher before any
weight is read: its ids fit the teacher's head, its special tokens are the teacher's, and a probe text's ids mean
the same text to the teacher's own tokenizer (when the teacher folder has one) ."""

from __future__ import annotations

from typing import Any

from cache_tools.format.errors import BuildError

# Letters, digits, punctuation, accents, CJK, emoji, code and whitespace: a tokenizer of another family differs on
# some of these even where two vocabularies share their common English words.
PROBE = "The quick brown fox jumps over 13 lazy dogs. Ünïcödé — 東京 🙂\n\tdef f(x): return x ** 2  # ok"
ALLOW_FLAG = "--allow-tokenizer-mismatch"


def tokenizer_problem(config: Any, tokenizer: Any, teacher_tokenizer: Any | None) -> str | None:
    """What makes `tokenizer` unfit for the teacher (`config`, and its own tokenizer when it has one), or None."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_rows = int(text_config.vocab_size)
    ids = tokenizer.encode(PROBE, add_special_tokens=False)
    if ids and max(ids) >= head_rows:
        return f"the probe text has id {max(ids)}, outside the teacher head's {head_rows} rows"
    for name in ("eos", "bos"):
        theirs = getattr(teacher_tokenizer, f"{name}_token_id", None) if teacher_tokenizer is not None else \
            getattr(text_config, f"{name}_token_id", None)
        mine = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(theirs, list):
            theirs = theirs[0] if theirs else None
        if theirs is not None and mine is not None and int(theirs) != int(mine):
            return f"its {name.upper()} token is id {mine}, the teacher's is {theirs}"
    if teacher_tokenizer is not None:
        mine_text = tokenizer.decode(ids)
        theirs_text = teacher_tokenizer.decode(ids)
        if mine_text != theirs_text:
            return (f"the same ids read as different text by the teacher's own tokenizer ({mine_text[:24]!r} vs "
                    f"{theirs_text[:24]!r})")
    return None


def check_tokenizer(teacher: str, tokenizer_src: str, config: Any, tokenizer: Any, *, trust_remote_code: bool,
                    allow_mismatch: bool) -> None:
    """Refuse (BuildError, one line) a `--tokenizer` the teacher cannot read, unless `allow_mismatch`."""
    if allow_mismatch:
        return
    from transformers import AutoTokenizer

    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a teacher folder without a tokenizer: checked against its config alone
        teacher_tokenizer = None
    problem = tokenizer_problem(config, tokenizer, teacher_tokenizer)
    if problem:
        raise BuildError(f"--tokenizer {tokenizer_src}: does not match the teacher {teacher} ({problem}); the teacher "
                         f"would read its ids as other tokens. Use the teacher's own tokenizer, or pass {ALLOW_FLAG} "
                         "if this is really meant")
