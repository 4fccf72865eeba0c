"""Tool calls in a free-form chat reply (``tool_choice: "auto"``): the Hermes format.

    serve --enable-auto-tool-choice --tool-call-parser hermes

The reply may be text, tool calls, or both. In the Hermes format (Hermes 2/3, Qwen 2/2.5/3 and the
many chat templates that copied it) a call is a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and several blocks in a row are parallel calls. Two parts:

* ``constraint(tools, parallel)``: the structural tag (xgrammar's ``triggered_tags``) the request's
  grammar is compiled from. Text is free until the model writes ``<tool_call>``; from there it must
  write one of the request's functions by name and arguments that conform to that function's
  parameters, then ``}`` and ``</tool_call>``; then text is free again. With
  ``parallel_tool_calls: false`` the reply ends after its first call. So a call that finishes is
  always one the client can run. vLLM's parsers run on an unconstrained reply, where a call with
  malformed JSON or a misspelt name comes back as text.
* ``parse`` (a finished reply) and ``HermesStream`` (a streamed one) split the text into content and
  calls, with one result either way (``tests/serving/test_tool_parsers.py`` checks that every
  chunking of a reply streams what ``parse`` gives):
  - a block is a call when the text up to one of the end tags after it is JSON of the form
    ``{"name": one of the tools, "arguments": an object}`` (the first such end tag closes it: an
    argument's string may hold ``</tool_call>``);
  - a block still open when the reply ends is a call if its JSON is whole (a stop string may cut
    the closing tag); else it is content as written, tags, the whitespace before it and the rest
    of the reply included (a call cut by ``max_tokens``; without the grammar, malformed JSON);
  - every other text is content, in order: the text outside the blocks less the whitespace next to
    a call; content that is empty is None.
  A streamed call is sent whole, in one delta, when its block closes (OpenAI's clients accumulate
  deltas; one that holds the whole call is valid); content streams as it comes, less what might
  still turn out to be the start of ``<tool_call>`` or whitespace before one.
"""
from __future__ import annotations

import json
from typing import Any

__all__ = ["PARSERS", "START", "END", "constraint", "parse", "HermesStream", "tags_are_special"]

PARSERS = ("hermes",)
START, END = "<tool_call>", "</tool_call>"


def constraint(tools: dict[str, dict], parallel: bool) -> str:
    """The structural tag (JSON) that holds a reply's calls to ``tools`` (name -> parameters schema,
    already checked); ``parallel`` False: the reply ends after its first call."""
    tags = [{"type": "tag", "begin": f'{START}\n{{"name": {json.dumps(name)}, "arguments": ',
             "content": {"type": "json_schema", "json_schema": schema}, "end": f"}}\n{END}"}
            for name, schema in tools.items()]
    fmt = {"type": "triggered_tags", "triggers": [START], "tags": tags, "at_least_one": False,
           "stop_after_first": not parallel}
    return json.dumps({"type": "structural_tag", "format": fmt})


def tags_are_special(tokenizer) -> bool:
    """Whether ``tokenizer`` has the call tags as special tokens (some Hermes tokenizers; Qwen's are
    ordinary added tokens). The grammar matches a special token by its text, but the reply's text
    leaves special tokens out unless the request keeps them: then an "auto" request keeps them
    (``skip_special_tokens`` false, as vLLM sets it for its Hermes parser), else no call would be
    seen."""
    special = set(getattr(tokenizer, "all_special_tokens", None) or ())
    return START in special or END in special


def _call(block: str, tools) -> dict | None:
    """A block's text (between the tags) as {"name", "arguments"} (arguments as JSON text), or None."""
    try:
        obj = json.loads(block)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
        return None
    name, args = obj["name"], obj["arguments"]
    if not isinstance(name, str) or name not in tools or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}


def _partial_start(text: str) -> int:
    """The length of the longest end of ``text`` that begins ``START`` (0: none)."""
    for k in range(min(len(text), len(START) - 1), 0, -1):
        if START.startswith(text[-k:]):
            return k
    return 0


class HermesStream:
    """One streamed reply: ``feed(text)`` and then ``finish()`` return events, ("content", text) or
    ("call", {"name", "arguments"}), in order; their content joined and their calls equal ``parse``
    of the whole text."""

    def __init__(self, tools):
        self.tools = tools
        self.buf = ""  # unsent text: outside a block (state "out") or a block's body ("in")
        self.inside = False
        self.after_block = False  # no content since the last block: its whitespace is dropped
        self.ws = ""  # the whitespace before the open block: dropped if it is a call, else content
        self.scan = 0  # where in the open block's text to look for its end tag next

    def _content(self, text: str, events: list) -> None:
        if text:
            events.append(("content", text))

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while True:
            if self.inside:
                while True:  # the first end tag after which the block is a call
                    end = self.buf.find(END, self.scan)
                    if end < 0:
                        return events
                    call = _call(self.buf[:end], self.tools)
                    if call is not None:
                        break
                    self.scan = end + len(END)  # (an argument's string may hold the tag: look further)
                events.append(("call", call))
                self.buf, self.scan, self.inside, self.after_block = self.buf[end + len(END):], 0, False, True
                continue
            if self.after_block:  # whitespace right after a call is dropped
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return events
            start = self.buf.find(START)
            if start >= 0:
                before = self.buf[:start].rstrip()
                self._content(before, events)
                self.ws = self.buf[len(before):start]
                self.buf, self.inside, self.after_block = self.buf[start + len(START):], True, False
                continue
            # send all but a possible start of START and the whitespace that may precede a block
            keep = _partial_start(self.buf)
            head = self.buf[:len(self.buf) - keep]
            sent = head.rstrip()
            self._content(sent, events)
            if sent:
                self.after_block = False
            self.buf = self.buf[len(sent):]
            return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        if self.inside:  # an open block at the end: a call if its JSON is whole (its tag cut), else text
            call = _call(self.buf, self.tools)
            if call is None:
                self._content(self.ws + START + self.buf, events)
            else:
                events.append(("call", call))
        else:  # the held end: a cut start of a tag, or whitespace (after a block already dropped)
            self._content(self.buf, events)
        self.buf, self.inside, self.scan = "", False, 0
        return events


def parse(text: str, tools) -> tuple[str | None, list[dict]]:
    """A finished reply's (content, calls): the module docstring's rules."""
    stream = HermesStream(tools)
    events = stream.feed(text) + stream.finish()
    content = "".join(t for kind, t in events if kind == "content")
    return (content or None), [c for kind, c in events if kind == "call"]
