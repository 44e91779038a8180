"""Cross-tokenizer alignment on hand-made texts, checked against an oracle that only uses the tokenizers' own
decoding: a student position must be aligned exactly when some teacher position decoded the same complete text
prefix, and its KD target must be the teacher's distribution at that position, mapped."""

from __future__ import annotations

import numpy as np
import pytest
from xtok_fixtures import trained_tokenizer

from cache_tools.format import schema
from cache_tools.format.reader import CachedSequence
from cache_tools.format.text_data import pack_windows
from distill.data.xtok.pipeline import CrossTokenizerTargets

CASES = {
    "whitespace_runs": "a  b   c\t\td    e \t x",
    "newlines": "line one\n\nline two\n\n\n   indented\r\nwindows",
    "digits": "in 1999 there were 123456 items, 3.14159 and 2,048 more",
    "punctuation": "Hello, world!? (yes) -- \"quoted\"... [x]; {y}: z'",
    "accented": "café naïve Zürich résumé Ångström façade",
    "cjk": "日本語のテキスト 中文文本 한국어",
    "emoji": "ok 😀😀 then 👍🏽 and 🇫🇷 flags 🧑‍💻 done",
    "split_word": "distillation tokenization internationalization antidisestablishmentarianism",
}


def make_sequence(teacher_tok, docs: list[str], top_k: int = 4, seed: int = 0) -> CachedSequence:
    """One packed window of `docs` (EOS between them) with a synthetic teacher whose slot 0 is the true next token."""
    window = list(pack_windows(teacher_tok, enumerate(docs), 10_000))[0]
    n = len(window.input_ids)
    rng = np.random.default_rng(seed)
    ids = np.empty((n, top_k), np.int64)
    ids[:, 0] = np.append(window.input_ids[1:], teacher_tok.eos_token_id)
    ids[:, 1:] = rng.permutation(np.arange(len(teacher_tok)))[: top_k - 1] if top_k > 1 else 0
    clash = (ids[:, 1:] == ids[:, :1]).any(1)
    ids[clash, 1:] = (ids[clash, 1:] + 1) % len(teacher_tok)  # keep ids unique per row
    lp = np.log(np.linspace(0.6, 0.05, top_k) / 1.0).astype(np.float16)[None].repeat(n, 0)
    tail = np.full(n, np.log(0.05), np.float32)
    return CachedSequence(0, window.input_ids, window.offsets, ids, lp, tail, np.zeros((1, 4), np.float16),
                          window.text, 0)


def manifest_for(tok, top_k: int = 4) -> schema.CacheManifest:
    return schema.CacheManifest(
        tokenizer=schema.TokenizerInfo(content_hash=schema.tokenizer_hash(tok), vocab_size=len(tok),
                                       special_ids={"eos": tok.eos_token_id}),
        targets=schema.TargetsInfo(top_k=top_k), max_length=10_000)


def complete_prefixes(tok, ids: np.ndarray) -> list[str | None]:
    """Oracle: decoded prefix after each position, None where it ends inside a character."""
    out: list[str | None] = []
    for i in range(len(ids)):
        text = tok.decode(ids[: i + 1].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(None if text.endswith("\ufffd") else text)
    return out


@pytest.fixture(scope="module")
def digit_tokenizer(corpus):
    """Another vocabulary size and another pre-tokenisation rule (digits split one by one)."""
    return trained_tokenizer(corpus, 400, split_digits=True)


@pytest.fixture(scope="module")
def builder(tokenizer, digit_tokenizer, tmp_path_factory):
    return CrossTokenizerTargets(manifest_for(tokenizer), tokenizer, digit_tokenizer,
                                 cache_dir=tmp_path_factory.mktemp("xtok_align"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_alignment_matches_decoded_prefixes(case, builder, tokenizer, digit_tokenizer):
    seq = make_sequence(tokenizer, [CASES[case], "second doc " + CASES[case][:12]])
    out = builder(seq)
    s_ids = out["input_ids"]
    # The student re-tokenised exactly the cached text, with its own EOS between the documents.
    assert digit_tokenizer.decode(s_ids.tolist(), clean_up_tokenization_spaces=False) == seq.text
    t_prefix = complete_prefixes(tokenizer, seq.input_ids)
    s_prefix = complete_prefixes(digit_tokenizer, s_ids)
    teacher_at = {p: t for t, p in enumerate(t_prefix) if p is not None}
    expected = np.array([p is not None and p in teacher_at for p in s_prefix])
    np.testing.assert_array_equal(out["kd_mask"], expected)
    assert out["stats"]["aligned"] == int(expected.sum()) > 0
    vmap = builder.vocab_map.ids
    for s in np.flatnonzero(expected):
        t = teacher_at[s_prefix[s]]
        # Slot 0 is the teacher's true next token: its mapped student id must begin that token's text.
        nxt = int(seq.topk_ids[t, 0])
        assert out["topk_ids"][s, 0] == vmap[nxt]
        t_piece = builder.teacher_bytes.tokens[nxt]
        assert t_piece.startswith(builder.student_bytes.tokens[out["topk_ids"][s, 0]])
        assert np.isclose(out["topk_logprobs"][s, 0], float(seq.topk_logprobs[t, 0]), atol=1e-6) or \
            out["topk_logprobs"][s, 0] > float(seq.topk_logprobs[t, 0])  # merged with a same-id candidate
    assert (out["topk_ids"][~out["kd_mask"]] == -1).all()


def test_emoji_partial_bytes_are_never_aligned_mid_character(builder, tokenizer):
    seq = make_sequence(tokenizer, [CASES["emoji"]])
    # The locally trained tokenizers spell emoji with several byte tokens sharing one character span.
    spans = [tuple(o) for o in seq.offsets.tolist()]
    assert len(spans) > len(set(spans)), "test text should contain multi-token characters"
    out = builder(seq)
    prefixes = complete_prefixes(builder.student_tok, out["input_ids"])
    for s in np.flatnonzero(out["kd_mask"]):
        assert prefixes[s] is not None


def test_window_cut_inside_a_character(builder, tokenizer):
    """A window that ends after the first byte token of an emoji: its last position has not consumed the emoji and
    must not be aligned with the student's (whole-emoji) last position."""
    seq = make_sequence(tokenizer, ["go 😀"])
    last_span = tuple(seq.offsets[-1])
    partial = [i for i, o in enumerate(seq.offsets.tolist()) if tuple(o) == last_span]
    assert len(partial) >= 2
    cut = partial[0] + 1
    short = CachedSequence(0, seq.input_ids[:cut], seq.offsets[:cut], seq.topk_ids[:cut], seq.topk_logprobs[:cut],
                           seq.tail_logprob[:cut], seq.pooled_hidden, seq.text, 0)
    out = builder(short)
    assert not out["kd_mask"][-1]
    assert out["stats"]["skipped"] == 0 and out["kd_mask"].any()
