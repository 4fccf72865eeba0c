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
    argument's string may hold ``</tool_call>``); the call's arguments are the model's own JSON text
    (not decoded and encoded again: that would turn ``1e400`` into ``Infinity``);
  - a block still open when the reply ends is a call if its JSON is whole (a stop string may cut
    the closing tag); else it is content as written, its tags and the rest of the reply included (a
    call cut by ``max_tokens``; without the grammar, malformed JSON);
  - the content is all the text outside the calls, as written, less its trailing whitespace when
    the reply made calls; None when it is only whitespace.
  A streamed call is sent whole, in one delta, when its block closes (OpenAI's clients accumulate
  deltas; one that holds the whole call is valid); content streams as it comes, less what might
  still turn out to be the start of ``<tool_call>``, and whitespace until text follows it (so a
  reply of calls and whitespace sends no content, as ``parse`` gives None).
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


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _raw_member(text: str, key: str) -> str:
    """The JSON text of the last ``key`` member of the object ``text`` (already checked to parse)."""
    dec, i, raw = json.JSONDecoder(), 0, ""

    def ws(j: int) -> int:
        while j < len(text) and text[j] in " \t\n\r":
            j += 1
        return j

    i = ws(i) + 1  # past "{"
    while True:
        i = ws(i)
        if text[i] == "}":
            return raw
        name, i = json.decoder.scanstring(text, i + 1)
        i = ws(ws(i) + 1)  # past ":"
        _, end = dec.raw_decode(text, i)
        if name == key:
            raw = text[i:end]
        i = ws(end)
        if text[i] == ",":
            i += 1


def _call(block: str, tools) -> dict | None:
    """A block's text (between the tags) as {"name", "arguments"} (arguments: the JSON text as the
    model wrote it), or None."""
    try:  # (NaN / Infinity are not JSON, though Python's parser reads them)
        obj = json.loads(block, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
        return None
    name, args = obj["name"], obj["arguments"]
    if not isinstance(name, str) or name not in tools or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": _raw_member(block, "arguments")}


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
        self.buf = ""  # unsent text: outside a block, or the open block's body
        self.inside = False
        self.scan = 0  # where in the open block's text to look for its end tag next
        self.held = ""  # whitespace outside the blocks, sent when text follows it
        self.spoke = False  # content other than whitespace sent
        self.called = False  # a call sent

    def _text(self, text: str, events: list) -> None:
        """Text outside the blocks, in order: sent less its trailing whitespace (held)."""
        body = text.rstrip()
        if body:
            events.append(("content", self.held + body))
            self.held, self.spoke = text[len(body):], True
        else:
            self.held += text

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while True:
            if self.inside:
                while True:  # the first end tag after which the block is a call
                    end = self.buf.find(END, self.scan)
                    if end < 0:  # (what was searched is not searched again)
                        self.scan = max(self.scan, len(self.buf) - len(END) + 1)
                        return events
                    call = _call(self.buf[:end], self.tools)
                    if call is not None:
                        break
                    self.scan = end + len(END)  # (an argument's string may hold the tag: look further)
                events.append(("call", call))
                self.buf, self.scan, self.inside, self.called = self.buf[end + len(END):], 0, False, True
                continue
            start = self.buf.find(START)
            if start >= 0:
                self._text(self.buf[:start], events)
                self.buf, self.inside = self.buf[start + len(START):], True
                continue
            keep = _partial_start(self.buf)  # a possible start of START stays
            self._text(self.buf[:len(self.buf) - keep], events)
            self.buf = self.buf[len(self.buf) - keep:]
            return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        if self.inside:  # an open block at the end: a call if its JSON is whole (its tag cut), else text
            call = _call(self.buf, self.tools)
            if call is None:
                self._text(START + self.buf, events)
            else:
                events.append(("call", call))
                self.called = True
        else:
            self._text(self.buf, events)
        if self.held and self.spoke and not self.called:  # a reply of text alone ends as written
            events.append(("content", self.held))
        self.buf, self.inside, self.scan, self.held = "", False, 0, ""
        return events


def parse(text: str, tools) -> tuple[str | None, list[dict]]:
    """A finished reply's (content, calls): the module docstring's rules."""
    stream = HermesStream(tools)
    events = stream.feed(text) + stream.finish()
    content = "".join(t for kind, t in events if kind == "content")
    return (content or None), [c for kind, c in events if kind == "call"]
