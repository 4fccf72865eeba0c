"""Incremental detokenisation: O(1) amortised tokenizer work per generated token.

    state = DetokState()
    committed, pending = detokenize(tokenizer, output_ids, state)   # after each new token

The approach vLLM uses (prefix / read offsets): decode only a short window of the most recent
tokens, ``ids[prefix_offset:]``, and subtract the decoding of its already-read head
``ids[prefix_offset:read_offset]``; what is left is the new text. Decoding a window that starts one
token earlier than the new ones keeps tokenizers that drop or merge a leading space (SentencePiece
"▁") consistent with decoding the whole output. While the window's text ends in U+FFFD (a UTF-8
character split across tokens) nothing is committed and the offsets stay, so the window grows
until the character is whole. ``committed`` is text that will not change; ``pending`` is the
window's undecided tail (ending in U+FFFD), returned so a caller that finishes now can emit what a
full ``decode`` would have given.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DetokState", "detokenize"]


@dataclass
class DetokState:
    prefix_offset: int = 0
    read_offset: int = 0
    decoded_tokens: int = 0  # tokens passed to tokenizer.decode so far (the tests read it)


def detokenize(tokenizer, ids: list[int], state: DetokState, skip_special_tokens: bool = True) -> tuple[str, str]:
    """(new committed text, pending text) after ``ids`` grew by one or more tokens."""
    po, ro = state.prefix_offset, state.read_offset
    head = tokenizer.decode(ids[po:ro], skip_special_tokens=skip_special_tokens) if ro > po else ""
    window = tokenizer.decode(ids[po:], skip_special_tokens=skip_special_tokens)
    state.decoded_tokens += (ro - po) + (len(ids) - po)
    if len(window) <= len(head):
        return "", ""
    new = window[len(head):]
    if new.endswith("\ufffd"):
        return "", new
    state.prefix_offset, state.read_offset = ro, len(ids)
    return new, ""
