"""Raw byte strings of every token of a (fast) HF tokenizer, the common currency of cross-tokenizer alignment.

Vocabulary strings are encodings, not text: byte-level BPE (GPT-2, Qwen, SmolLM) spells bytes as printable
characters (`Ġ` = space, `Ċ` = newline, `ðŁĺ` = the first bytes of an emoji), SentencePiece spells a space `▁` and
unknown bytes `<0xNN>`. Comparing tokens of two tokenizers, or measuring how much text a token consumed, needs the
bytes they stand for.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cache_tools.format.errors import TokenizerError

log = logging.getLogger(__name__)

BYTE_LEVEL = "byte_level"
METASPACE = "metaspace"
PLAIN = "plain"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")



def tokenizer_label(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def require_fast(tokenizer: Any, role: str) -> None:
    """Offsets (which text a token consumed) only come from Rust-backed tokenizers."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TokenizerError(
            f"{role} tokenizer {tokenizer_label(tokenizer)!r} is a slow (Python) tokenizer without offset mapping; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True) or ship a tokenizer.json"
        )


# str.translate table: byte-level character -> the latin-1 character of its byte, so `.encode("latin-1")` gives bytes
# for a whole vocabulary at C speed instead of a Python loop over characters.
# GPT-2's reversible byte -> printable character table (every byte-level BPE uses it), as transformers ships it.
_BYTE_LEVEL_TABLE = {ord(ch): b for b, ch in bytes_to_unicode().items()}


def plain_backend(tokenizer: Any) -> Any:
    """A copy of the Rust tokenizer with truncation and padding off (a tokenizer.json may ship with either on; the
    user's tokenizer object is left untouched)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def detect_kind(tokenizer: Any) -> str:
    """How the vocabulary spells bytes, from the backend's decoder / pre-tokeniser."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
    if '"ByteLevel"' in parts:
        return BYTE_LEVEL
    if '"Metaspace"' in parts or "\u2581" in parts:
        return METASPACE
    return PLAIN


@dataclass
class TokenBytes:
    """Per-id byte strings of one tokenizer (V = table size = max(len(tokenizer), highest id + 1)).

    tokens: list[bytes] [V]; b"" for ids that have no token.
    lengths: int64 [V] byte lengths.
    starts_continuation: bool [V] the token's first byte is a UTF-8 continuation byte (0b10xxxxxx), i.e. the token
        that precedes it ended in the middle of a character.
    special_ids: ids of special tokens (EOS, BOS, chat markers...): their bytes are their literal content.
    """

    kind: str
    tokens: list[bytes]
    lengths: np.ndarray
    starts_continuation: np.ndarray
    special_ids: frozenset[int]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def join(self, ids: np.ndarray) -> bytes:
        tokens = self.tokens
        return b"".join([tokens[i] for i in ids.tolist()])


def _decode_token(token: str, kind: str) -> bytes:
    if kind == BYTE_LEVEL:
        try:
            return token.translate(_BYTE_LEVEL_TABLE).encode("latin-1")
        except UnicodeEncodeError:  # a non-byte-level entry (rare hand-added tokens): take it as text
            return token.encode("utf-8")
    if kind == METASPACE:
        fallback = _BYTE_FALLBACK.match(token)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")
    return token.encode("utf-8")


def special_token_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def token_bytes_table(tokenizer: Any, role: str = "student") -> TokenBytes:
    """Byte strings of every id of `tokenizer` (vectorised enough for 150k-token vocabularies: ~0.2 s)."""
    require_fast(tokenizer, role)
    kind = detect_kind(tokenizer)
    vocab = tokenizer.get_vocab()
    added = {int(i): str(t.content if hasattr(t, "content") else t)
             for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1, max(added, default=-1) + 1)
    tokens: list[bytes] = [b""] * size
    for token, token_id in vocab.items():
        if token_id not in added:
            tokens[token_id] = _decode_token(token, kind)
    for token_id, content in added.items():
        # Added tokens are stored as raw text in every tokenizer kind.
        tokens[token_id] = content.encode("utf-8")
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=size)
    first = np.fromiter((t[0] if t else 0 for t in tokens), dtype=np.int64, count=size)
    starts_continuation = (first & 0xC0) == 0x80
    return TokenBytes(kind, tokens, lengths, starts_continuation, frozenset(special_token_ids(tokenizer)))


def utf8_tail_complete(data: bytes) -> bool:
    """True when `data` does not end in the middle of a UTF-8 character (only the last 4 bytes are examined)."""
    tail = data[-4:]
    for back in range(1, len(tail) + 1):
        byte = tail[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        if byte < 0x80:
            need = 1
        elif byte >= 0xF0:
            need = 4
        elif byte >= 0xE0:
            need = 3
        else:
            need = 2
        return back >= need
    return True  # only continuation bytes in view: the lead byte is further back; cannot tell, assume complete
