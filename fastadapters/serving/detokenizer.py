"""Incremental detokenisation: O(1) amortised tokenizer work per generated token.

    state = DetokState.after(prompt_ids)                                # once per request
    committed, pending = detokenize(tokenizer, output_ids, state)       # after each new token

The approach vLLM uses (prefix / read offsets): decode only a short window of the most recent
tokens, ``ids[prefix_offset:]``, and subtract the decoding of its already-read head
``ids[prefix_offset:read_offset]``; what is left is the new text. Decoding a window that starts one
token earlier than the new ones keeps tokenizers that drop or merge a leading space (SentencePiece
"▁") consistent. The output's first tokens are decoded after the prompt's last few
(``context``, read but never emitted), as vLLM does: a SentencePiece tokenizer drops the space of a
text's first "▁" piece, so an output decoded alone would lose the space between the prompt and
its first word ("ab hello" + "▁h" must read " h", not "h"). While the window's text ends in
U+FFFD (a UTF-8 character split across tokens) nothing is committed and the offsets stay, so the
window grows until the character is whole. ``committed`` is text that will not change; ``pending``
is the window's undecided tail (ending in U+FFFD), returned so a caller that finishes now can emit
what a full ``decode`` of context and output, less the context's own text, would have given.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DetokState", "detokenize"]


CONTEXT_TOKENS = 4  # the prompt's last tokens the output is decoded after (vLLM: 5)


@dataclass
class DetokState:
    prefix_offset: int = 0  # offsets into context + output ids
    read_offset: int = 0
    decoded_tokens: int = 0  # tokens passed to tokenizer.decode so far (the tests read it)
    context: tuple[int, ...] = ()  # the prompt's last tokens (read, never emitted)

    @classmethod
    def after(cls, prompt_ids: list[int]) -> "DetokState":
        """The state of an output that follows ``prompt_ids``: its last CONTEXT_TOKENS are read."""
        tail = tuple(prompt_ids[-CONTEXT_TOKENS:]) if CONTEXT_TOKENS else ()
        return cls(prefix_offset=0, read_offset=len(tail), context=tail)


def detokenize(tokenizer, ids: list[int], state: DetokState, skip_special_tokens: bool = True) -> tuple[str, str]:
    """(new committed text, pending text) after ``ids`` grew by one or more tokens; the state's
    ``context`` is decoded before ``ids`` (its offsets count it) and its text is never returned."""
    po, ro = state.prefix_offset, state.read_offset
    context = state.context
    n = len(context)

    def span(a: int, b: int) -> list[int]:  # context + ids, [a, b), copying only what it returns
        return ids[a - n:b - n] if a >= n else list(context[a:b]) + ids[:max(b - n, 0)]

    end = n + len(ids)
    head = tokenizer.decode(span(po, ro), skip_special_tokens=skip_special_tokens) if ro > po else ""
    window = tokenizer.decode(span(po, end), skip_special_tokens=skip_special_tokens)
    state.decoded_tokens += (ro - po) + (end - po)
    if len(window) <= len(head):
        return "", ""
    new = window[len(head):]
    if new.endswith("\ufffd"):
        return "", new
    state.prefix_offset, state.read_offset = ro, end
    return new, ""
