"""Incremental detokenisation (issue 19 item 3): work per token does not grow with output length,
and the emitted text and finish reasons equal decoding the whole output at every token (the
previous implementation, kept here as the reference)."""
from __future__ import annotations

import random

import pytest

from fastadapters.serving.detokenizer import CONTEXT_TOKENS
from fastadapters.serving.engine import Engine
from fastadapters.serving.sampling import SamplingParams
from fastadapters.serving.scheduler import Request
from .char_tokenizer import char_tokenizer
from .serve_helpers import tiny_engine
from .serve_helpers import one_thread  # noqa: F401 - fixture


class _Counting:
    """A tokenizer whose ``decode`` counts the token ids it is given."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def decode(self, ids, **kw):
        self.calls.append(len(ids))
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_decode_work_per_token_does_not_grow_with_output_length():
    tok = _Counting(char_tokenizer())
    engine = tiny_engine(tokenizer=tok, max_model_len=128)
    req = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=120, temperature=0))[0]
    assert len(req.output_ids) == 120
    assert req.text == tok.tok.decode(req.output_ids, skip_special_tokens=True)
    # a window of at most a few tokens per call (one character per token here), whatever the length;
    # the first calls also read the prompt's last CONTEXT_TOKENS (detokenizer.py)
    assert max(tok.calls) <= 3 + CONTEXT_TOKENS and max(tok.calls[8:]) <= 3
    assert sum(tok.calls) <= 3 * len(req.output_ids) + 2 * CONTEXT_TOKENS


def _reference(tok, ids_seq, stops, max_tokens):
    """The old engine: decode the whole output at every token, stops searched near the end."""
    text, outs = "", []
    for n in range(1, len(ids_seq) + 1):
        ids = ids_seq[:n]
        reason = "length" if n >= max_tokens else None
        full = tok.decode(ids, skip_special_tokens=True)
        hits = [i for i in (full.find(s, max(0, len(text) - len(s))) for s in stops) if i >= 0]
        if hits:
            full, reason = full[:min(hits)], "stop"
        final = full if reason else Engine._stable_prefix(full, stops)
        piece = ""
        if len(final) > len(text) and final.startswith(text):
            piece, text = final[len(text):], final
        outs.append((piece, reason))
        if reason:
            break
    return outs


def _incremental(tok, ids_seq, stops, max_tokens, prompt=(1,)):
    from types import SimpleNamespace

    eng = SimpleNamespace(tokenizer=tok, _stable_prefix=Engine._stable_prefix)
    req = Request(list(prompt), SamplingParams(max_tokens=max_tokens, stop=list(stops)))
    outs = []
    for token in ids_seq:
        req.output_ids.append(token)
        reason = "length" if len(req.output_ids) >= max_tokens else None
        outs.append(Engine._new_text(eng, req, reason))
        if outs[-1][1]:
            break
    return outs


def test_incremental_text_equals_whole_output_decoding_on_a_real_tokenizer():
    from .real_model import smollm2_dir

    path, why = smollm2_dir()
    if path is None:
        pytest.skip(why)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    text = ("Grüße aus Köln! 東京タワー 🚀🚀 naïve café — \"quoted\" lines\n\nand ünïcödé ½ ⅞; the end. " * 3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    cases = [([], len(ids)), (["\n\n"], len(ids)), (["Köln", "🚀"], len(ids)), (["end."], 40), (["zz"], 25)]
    for _ in range(6):  # random token soups: split multi-byte characters, special tokens in between
        soup = [rng.randrange(tok.vocab_size) for _ in range(60)]
        assert _incremental(tok, soup, ["e", "an"], len(soup)) == _reference(tok, soup, ["e", "an"], len(soup))
    for stops, max_tokens in cases:
        assert _incremental(tok, ids, stops, max_tokens) == _reference(tok, ids, stops, max_tokens), stops


def test_a_sentencepiece_output_reads_on_from_its_prompt():
    """A SentencePiece tokenizer drops the space of a text's first "\u2581" piece: the output is
    decoded after the prompt's last tokens, so it equals the whole text's decoding past the prompt's
    (vLLM's text), not the output decoded alone."""
    from .test_sampling_features import _metaspace_tokenizer

    tok = _metaspace_tokenizer()
    prompt = tok("ab hello", add_special_tokens=False)["input_ids"]
    rng = random.Random(1)
    for _ in range(6):
        out = [rng.choice([63, 63, 3] + list(range(4, 63))) for _ in range(30)]  # many "\u2581h" and "\u2581"
        got = "".join(piece for piece, _ in _incremental(tok, out, [], len(out), prompt=prompt))
        assert got == tok.decode(prompt + out)[len(tok.decode(prompt)):]
        if out[0] == 63:
            assert got.startswith(" h")
    assert "".join(p for p, _ in _incremental(tok, [63, 4], [], 2, prompt=prompt)) == " ha"
