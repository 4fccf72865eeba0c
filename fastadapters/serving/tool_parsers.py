"""Tool calls in a free-form chat reply (``tool_choice: "auto"``): the Hermes, Llama 3 JSON, Mistral and
pythonic formats.

    serve --enable-auto-tool-choice --tool-call-parser hermes        (or llama3_json, mistral, pythonic)

The reply may be text, tool calls, or both.

* ``hermes`` (Hermes 2/3, Qwen 2/2.5/3 and the many chat templates that copied it): a call is a block

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  and several blocks in a row are parallel calls.
* ``llama3_json`` (Llama 3.1-3.3's JSON tool calling, and Llama 4's JSON template): a call is the
  object ``{"name": "get_weather", "parameters": {"city": "Paris"}}`` in the text, several of them
  separated by ``;``; the model may write ``<|python_tag|>`` before one (a special token: in the
  text only where the request keeps special tokens).
* ``mistral`` (Mistral 7B v0.3, Nemo, Small, Mixtral 8x22B: tokenizers v3 and v7): the calls are
  ``[TOOL_CALLS]`` and a JSON array ``[{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]``
  (``[`` or `` [`` after the tag, the calls separated by ``, ``, as Mistral's templates write them);
  ``[TOOL_CALLS]`` is a special token in Mistral's tokenizers, so "auto" requests keep special
  tokens there (``tags_are_special``). The newer ``[TOOL_CALLS]name[ARGS]{...}`` form (tokenizers v11
  and later: Magistral, Devstral, Mistral Small 3.2) is not read: its ``[TOOL_CALLS]`` opens a block
  that is not an array, which is text. A call's id is 9 letters and digits (``call_id``): Mistral's
  templates refuse any other id when the call comes back in the next request.
* ``pythonic`` (Llama 3.2, Llama 4, and others with the same template): the whole reply is a Python
  list of calls by keyword, ``[get_weather(city="Paris", unit='celsius'), now()]``, the values Python
  literals (str, int, float, True / False / None, lists, tuples, dicts with string keys), optionally
  between Llama 4's ``<|python_start|>`` and ``<|python_end|>``. It is read with ``ast`` (never run).

Two parts:

* ``constraint(tools, parallel, parser)``: the structural tag (xgrammar's ``triggered_tags``) the
  request's grammar is compiled from. Text is free until the model writes ``<tool_call>`` (hermes),
  ``{"name": `` (llama3_json, xgrammar's own "llama" format) or ``[TOOL_CALLS]`` (mistral); from
  there it must write one of the request's functions by name and arguments that conform to that
  function's parameters, then close the call (``}`` and ``</tool_call>``; ``}``; ``}`` and then
  ``, `` and the next call of the array, or ``]``); then text is free again. With
  ``parallel_tool_calls: false`` the reply ends after its first call. So a call that finishes is
  always one the client can run. vLLM's parsers run on an unconstrained reply, where a call with
  malformed JSON or a misspelt name comes back as text. ``pythonic`` has no constraint (None): its
  arguments are Python literals, which no JSON schema grammar writes, and its text could only be
  held by forbidding a reply that begins with ``[``. Its replies are read as vLLM reads them: a
  reply that is not wholly a list of calls of the tools (a malformed call, an unknown name, text
  around the list) is content, and ``parallel_tool_calls: false`` is not enforced (every call of the
  list is returned).
* ``parse`` (a finished reply) and ``stream(parser, tools)`` (a streamed one) split the text into
  content and calls, with one result either way (``tests/serving/test_tool_parsers.py`` checks that
  every chunking of a reply streams what ``parse`` gives):
  - a call that opens as the grammar writes it (``<tool_call>\n{"name": "get_weather", "arguments":
    `` / ``{"name": "get_weather", "parameters": ``, one of the tools named) is a call from there
    on. Streamed, its id and name go out as soon as that opening is whole and its arguments as
    they come, nothing held back (where they end is found by counting their brackets outside
    strings, so an argument may hold ``</tool_call>`` or ``}``); then the format's close
    (``}\n</tool_call>``, ``}``) is read past. Cut by ``max_tokens``, it is the call as far as it
    got (its arguments not whole JSON; ``finish_reason`` "length", or "stop" for a stop string,
    never "tool_calls"), as OpenAI's API cuts one; cut in its close (a stop string), it is whole.
    What follows its arguments where it is not the close (text no grammar held) is read as text.
    mistral: the grammar's openings are ``[TOOL_CALLS][{"name": "get_weather", "arguments": `` (or
    ``[TOOL_CALLS] [``) and, right after a call's ``}``, ``, {"name": "now", "arguments": `` for the
    next call of the array; ``}]`` closes it;
  - a block with another opening (text no grammar held) is read whole. hermes: it is a call when the
    text up to one of the end tags after it is JSON of the form ``{"name": one of the tools,
    "arguments": an object}`` (the first such end tag closes it), or, when the reply ends inside
    it, when its JSON is whole; else it is content as written, its tags and the rest of the reply
    included. llama3_json: it ends where its object closes and is a call when it is ``{"name": one
    of the tools, "parameters" (or "arguments", as vLLM reads it too): an object}``, else content as
    written, and the text goes on after it; still open when the reply ends, it is content. mistral:
    ``[TOOL_CALLS]`` and the JSON array after it (whitespace between), ending where the array
    closes, is calls when every element is ``{"name": one of the tools, "arguments": an object}``
    (and there is one at least), else content as written, and the text goes on after it; a tag not
    followed by ``[`` is content with the whitespace after it; still open when the reply ends,
    content;
  - pythonic: a reply whose first text other than whitespace is not ``[`` or ``<|python_start|>``
    is content, streamed as it comes; one that begins so is held until the reply ends and is then
    calls (content None) or, when it is not a list of calls, content as written. So its calls are
    sent whole at the end, not streamed as they come, and a cut one is content;
  - llama3_json: the run of whitespace, ``;`` and ``<|python_tag|>`` just before a call is its
    separator, not content;
  - a call's arguments are the model's own JSON text (not decoded and encoded again: that would
    turn ``1e400`` into ``Infinity``); pythonic's are its literals as JSON (``json.dumps``; a tuple
    becomes a list; a value JSON has no form for, such as ``1e400``, a set or a dict with other keys
    than strings, makes the reply content);
  - the content is all the other text, as written, less its trailing whitespace (llama3_json: and
    separators) when the reply made calls; None when it is only that. Streamed, it goes out as it
    comes, less what might still turn out to be the start of a call, and the held run until text
    follows it (so a reply of calls and whitespace sends no content, as ``parse`` gives None).
"""
from __future__ import annotations

import ast
import json
import secrets
import string
import uuid
from typing import Any

__all__ = ["PARSERS", "START", "END", "LLAMA3_START", "PYTHON_TAG", "TOOL_CALLS", "constraint", "parse", "split",
           "stream", "calls_of", "call_id", "HermesStream", "Llama3JsonStream", "MistralStream", "PythonicStream",
           "PYTHON_START", "PYTHON_END", "tags_are_special"]

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
START, END = "<tool_call>", "</tool_call>"  # hermes
LLAMA3_START, PYTHON_TAG = '{"name": ', "<|python_tag|>"  # llama3_json
TOOL_CALLS = "[TOOL_CALLS]"  # mistral
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"  # pythonic (Llama 4)


def constraint(tools: dict[str, dict], parallel: bool, parser: str = "hermes") -> str | None:
    """The structural tag (JSON) that holds a reply's calls to ``tools`` (name -> parameters schema,
    already checked) in ``parser``'s format; ``parallel`` False: the reply ends after its first call.
    None for ``pythonic``: its replies are not constrained (the module docstring)."""
    if parser == "pythonic":
        return None
    if parser == "hermes":
        trigger, key, end = START, "arguments", f"}}\n{END}"
    elif parser == "llama3_json":
        trigger, key, end = LLAMA3_START, "parameters", "}"
    elif parser == "mistral":  # one array of calls after the tag ("[" or " [": Mistral's templates write both)
        calls = [{"type": "tag", "begin": _call_begin(name), "content": {"type": "json_schema", "json_schema": schema},
                  "end": "}"} for name, schema in tools.items()]
        array = {"type": "sequence", "elements": [
            {"type": "or", "elements": [{"type": "const_string", "value": "["}, {"type": "const_string", "value": " ["}]},
            {"type": "tags_with_separator", "tags": calls, "separator": ", ", "at_least_one": True,
             "stop_after_first": not parallel}]}
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALLS], "at_least_one": False,
               "tags": [{"type": "tag", "begin": TOOL_CALLS, "content": array, "end": "]"}],
               "stop_after_first": not parallel}
        return json.dumps({"type": "structural_tag", "format": fmt})
    else:
        raise ValueError(f"parser: got {parser!r}; valid: one of {', '.join(PARSERS)}")
    opening = START + "\n" if parser == "hermes" else ""
    tags = [{"type": "tag", "begin": f'{opening}{{"name": {json.dumps(name)}, "{key}": ',
             "content": {"type": "json_schema", "json_schema": schema}, "end": end}
            for name, schema in tools.items()]
    fmt = {"type": "triggered_tags", "triggers": [trigger], "tags": tags, "at_least_one": False,
           "stop_after_first": not parallel}
    return json.dumps({"type": "structural_tag", "format": fmt})


def tags_are_special(tokenizer, parser: str = "hermes") -> bool:
    """Whether ``tokenizer`` has ``parser``'s call tags as special tokens (some Hermes tokenizers;
    Qwen's are ordinary added tokens; Mistral's ``[TOOL_CALLS]`` is one wherever the vocabulary has
    it; llama3_json's calls have no tags). The grammar matches a special token by its text, but the
    reply's text leaves special tokens out unless the request keeps them: then an "auto" request
    keeps them (``skip_special_tokens`` false, as vLLM sets it for its Hermes and Mistral parsers),
    else no call would be seen. A special token is one of ``all_special_tokens`` or an added token
    marked special (which ``decode`` leaves out too, though not listed there)."""
    tags = {"hermes": (START, END), "mistral": (TOOL_CALLS,)}.get(parser)
    if tags is None:
        return False
    special = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {str(t) for t in added.values() if getattr(t, "special", False)}
    return any(tag in special for tag in tags)


def call_id(parser: str) -> str:
    """A new tool call's id: Mistral's 9 letters and digits for ``mistral`` (its chat templates refuse
    any other id when the call comes back in the next request's messages, and vLLM's parser makes such
    ids), else ``chatcmpl-tool-`` and 32 hex digits."""
    if parser == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "chatcmpl-tool-" + uuid.uuid4().hex


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


def _call(block: str, tools, keys=("arguments",)) -> dict | None:
    """A block's JSON text as {"name", "arguments"} (arguments: the JSON text as the model wrote it),
    or None: the block must be an object of "name" and one of ``keys``."""
    try:  # (NaN / Infinity are not JSON, though Python's parser reads them)
        obj = json.loads(block, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    key = next((k for k in keys if isinstance(obj, dict) and set(obj) == {"name", k}), None)
    if key is None:
        return None
    name, args = obj["name"], obj[key]
    if not isinstance(name, str) or name not in tools or not isinstance(args, dict):
        return None
    return {"name": name, "arguments": _raw_member(block, key)}


def _partial_start(text: str, *marks: str) -> int:
    """The length of the longest end of ``text`` that begins one of ``marks`` (0: none)."""
    for k in range(min(len(text), max(len(m) for m in marks) - 1), 0, -1):
        if any(m.startswith(text[-k:]) for m in marks):
            return k
    return 0


class _Stream:
    """One streamed reply: ``feed(text)`` and then ``finish()`` return events in order: ("content",
    text); ("call_open", name) then ("call_args", text) pieces for a call that opened as the grammar
    writes it (its arguments streamed as they come); ("call", {"name", "arguments"}) for one read
    whole (another opening); ("cut", None) last where the reply ended inside a call's arguments.
    Their content joined and their calls equal ``parse`` of the whole text. A subclass gives its
    format's openings and closing (``opening``, ``close``) and finds the blocks of other openings
    (``_block``)."""

    start = ""  # the text that opens a block
    marks: tuple[str, ...] = ()  # what a held end of the text outside the blocks may be the start of
    close = ""  # what follows a call's arguments where the grammar wrote the call

    def __init__(self, tools):
        self.tools = tools
        self.openings = {self.opening(name): name for name in tools}
        self.buf = ""  # unsent text: outside a block, or the open block's text
        self.inside = False  # in a block read whole (``_block``)
        self.scan = 0  # where in that block's text to go on looking for its end
        self.args: _ObjectEnd | None = None  # in a streamed call's arguments
        self.closing = False  # past a streamed call's arguments, before its close
        self.held = ""  # a run outside the blocks (whitespace, separators), sent when text follows it
        self.spoke = False  # content other than the held runs sent
        self.called = False  # a call sent

    @staticmethod
    def opening(name: str) -> str:
        """The text before a call's arguments, as the grammar writes it (the structural tag's begin)."""
        raise NotImplementedError

    def _trail(self, text: str) -> int:
        """Where the run that ``_text`` holds back starts in ``text`` (its trailing whitespace)."""
        return len(text.rstrip())

    def _text(self, text: str, events: list) -> None:
        """Text outside the blocks, in order: sent less its trailing run (held)."""
        cut = self._trail(text)
        if cut:
            events.append(("content", self.held + text[:cut]))
            self.held, self.spoke = text[cut:], True
        else:
            self.held += text

    def _call_made(self, event: tuple[str, Any], events: list) -> None:
        """A call begins (what is held before it stays held: sent if text follows the call)."""
        events.append(event)
        self.called = True

    def _close(self) -> int | tuple[str, int] | bool | None:
        """After a streamed call's arguments (``buf``): the length of the format's close, read past;
        (tool name, length) where the close goes straight on into the next call's opening (mistral's
        array); None while ``buf`` may still become either; False when it is not the close."""
        rest = self.buf.lstrip()
        if rest.startswith(self.close):
            return len(self.buf) - len(rest) + len(self.close)
        return None if self.close.startswith(rest) else False

    def _block(self) -> tuple[int, dict | list[dict] | None] | None:
        """The open block read whole (``self.buf``, from its opening): None while it may go on; else
        (where it ends in ``buf``, the call (or mistral's list of calls) or None when it is not one:
        then its text is content)."""
        raise NotImplementedError

    def _open_at_end(self) -> dict | None:
        """The call an open block read whole is when the reply ends there, or None (its text is content)."""
        return None

    def _opened(self) -> tuple[str, int] | bool:
        """At a block's start (``buf``): (tool name, opening length) for a call opened as the grammar
        writes it; True while ``buf`` may still become one; False for any other block."""
        for text, name in self.openings.items():
            if self.buf.startswith(text):
                return name, len(text)
        return any(text.startswith(self.buf) for text in self.openings)

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        while True:
            if self.args is not None:  # a call's arguments: sent as they come, up to where they close
                end = self.args.scan(self.buf)
                piece = self.buf if end < 0 else self.buf[:end]
                if piece:
                    events.append(("call_args", piece))
                if end < 0:
                    self.buf = ""
                    return events
                self.buf, self.args, self.closing = self.buf[end:], None, True
                continue
            if self.closing:  # then the format's close (whitespace before it allowed)
                got = self._close()
                if got is None:
                    return events  # more to come
                self.closing = False
                if got is False:  # not the close (text no grammar held): read on as text
                    continue
                if isinstance(got, int):
                    self.buf = self.buf[got:]
                    continue
                name, length = got  # the close, and the next call's opening (mistral's array)
                self._call_made(("call_open", name), events)
                self.buf, self.args = self.buf[length:], _ObjectEnd()
                continue
            if self.inside:
                got = self._block()
                if got is None:
                    return events
                end, call = got
                if call is None:
                    self._text(self.buf[:end], events)
                else:
                    for one in (call if isinstance(call, list) else [call]):
                        self._call_made(("call", one), events)
                self.buf, self.scan, self.inside = self.buf[end:], 0, False
                continue
            at = self.buf.find(self.start)
            if at >= 0:
                self._text(self.buf[:at], events)
                self.buf = self.buf[at:]
                opened = self._opened()
                if opened is True:
                    return events  # may still be a call's opening
                if opened is False:
                    self.inside = True
                    continue
                name, length = opened
                self._call_made(("call_open", name), events)
                self.buf, self.args = self.buf[length:], _ObjectEnd()
                continue
            keep = _partial_start(self.buf, *self.marks)  # a possible start of a block or a held mark stays
            self._text(self.buf[:len(self.buf) - keep], events)
            self.buf = self.buf[len(self.buf) - keep:]
            return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        if self.args is not None:  # a streamed call cut in its arguments stays as sent
            events.append(("cut", None))
        elif self.closing:  # cut in its close (a stop string): whole
            pass
        elif self.inside and (call := self._open_at_end()) is not None:
            self._call_made(("call", call), events)
        else:  # an open block that is not a call, or text that only might have started one: as written
            self._text(self.buf, events)
        if self.held and not self.called and (self.spoke or self.held.strip()):  # text alone: as written
            events.append(("content", self.held))
        self.buf, self.inside, self.scan, self.held, self.args, self.closing = "", False, 0, "", None, False
        return events


class HermesStream(_Stream):
    """``<tool_call>`` JSON ``</tool_call>`` blocks (the module docstring's rules)."""

    start = START
    marks = (START,)
    close = f"}}\n{END}"

    @staticmethod
    def opening(name: str) -> str:
        return f'{START}\n{{"name": {json.dumps(name)}, "arguments": '

    def _block(self):
        while True:  # the first end tag after which the block is a call
            end = self.buf.find(END, self.scan)
            if end < 0:  # (what was searched is not searched again)
                self.scan = max(self.scan, len(self.buf) - len(END) + 1)
                return None
            call = _call(self.buf[len(START):end], self.tools)
            if call is not None:
                return end + len(END), call
            self.scan = end + len(END)  # (an argument's string may hold the tag: look further)

    def _open_at_end(self):  # its JSON whole: a call whose closing tag was cut (a stop string)
        return _call(self.buf[len(START):], self.tools)


class _ObjectEnd:
    """Where a JSON object closes: its brackets counted outside its strings, read incrementally
    (each character once). Text before the object's first bracket (whitespace) is read past."""

    def __init__(self):
        self.depth, self.in_str, self.esc, self.pos = 0, False, False, 0

    def find(self, text: str) -> int:
        """The end (past the closing brace) of the object ``text`` starts with, or -1 while open;
        ``text`` grows between calls (what was read is not read again)."""
        start = self.pos
        end = self.scan(text[start:])
        return -1 if end < 0 else start + end

    def scan(self, chunk: str) -> int:
        """Read the object's next ``chunk``: where in it the object closes (past its brace), or -1."""
        depth, in_str, esc = self.depth, self.in_str, self.esc
        for i, ch in enumerate(chunk):
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    self.depth, self.in_str, self.esc = depth, in_str, esc
                    self.pos += i + 1
                    return i + 1
        self.depth, self.in_str, self.esc = depth, in_str, esc
        self.pos += len(chunk)
        return -1


class Llama3JsonStream(_Stream):
    """Llama 3's JSON calls, ``{"name": ..., "parameters": {...}}`` in the text, separated by ``;``
    (the module docstring's rules)."""

    start = LLAMA3_START
    marks = (LLAMA3_START, PYTHON_TAG)
    close = "}"

    @staticmethod
    def opening(name: str) -> str:
        return f'{{"name": {json.dumps(name)}, "parameters": '

    def __init__(self, tools):
        super().__init__(tools)
        self.end = _ObjectEnd()

    def _trail(self, text: str) -> int:  # whitespace, ";" and <|python_tag|> are held
        while True:
            body = text.rstrip(" \t\n\r;")
            if not body.endswith(PYTHON_TAG):
                return len(body)
            text = body[:-len(PYTHON_TAG)]

    def _call_made(self, event, events: list) -> None:  # the run before a call is its separator
        self.held = ""
        super()._call_made(event, events)

    def _block(self):
        end = self.end.find(self.buf)
        if end < 0:
            return None
        self.end = _ObjectEnd()
        return end, _call(self.buf[:end], self.tools, ("parameters", "arguments"))


def _call_begin(name: str) -> str:
    """The text before a call's arguments in a Mistral array (the grammar's begin of each call)."""
    return f'{{"name": {json.dumps(name)}, "arguments": '


def _array_calls(text: str, tools) -> list[dict] | None:
    """A JSON array's text as its calls ({"name", "arguments"} each, arguments as written), or None
    unless it is a non-empty array of calls (``_call``: "name" one of the tools, "arguments" an object)."""
    try:
        items = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list) or not items:
        return None
    dec, i, calls = json.JSONDecoder(), text.index("[") + 1, []
    for _ in items:  # each element's own text
        while text[i] in " \t\n\r,":
            i += 1
        _, end = dec.raw_decode(text, i)
        call = _call(text[i:end], tools)
        if call is None:
            return None
        calls.append(call)
        i = end
    return calls


class MistralStream(_Stream):
    """Mistral's ``[TOOL_CALLS]`` and a JSON array of ``{"name": ..., "arguments": {...}}`` calls
    (the module docstring's rules)."""

    start = TOOL_CALLS
    marks = (TOOL_CALLS,)
    ends = ("}]",)  # after a call's arguments: the array closes, or the next call opens (``nexts``)

    @staticmethod
    def opening(name: str) -> str:
        return TOOL_CALLS + "[" + _call_begin(name)

    def __init__(self, tools):
        super().__init__(tools)
        self.openings.update({f"{TOOL_CALLS} [{_call_begin(name)}": name for name in tools})  # (either spelling)
        self.nexts = {"}, " + _call_begin(name): name for name in tools}
        self.end: _ObjectEnd | None = None

    def _close(self):
        rest = self.buf.lstrip()
        skip = len(self.buf) - len(rest)
        if rest.startswith("}]"):
            return skip + 2
        for text, name in self.nexts.items():
            if rest.startswith(text):
                return name, skip + len(text)
        return None if any(c.startswith(rest) for c in (*self.ends, *self.nexts)) else False

    def _block(self):
        body = self.buf[len(TOOL_CALLS):]
        array = body.lstrip()
        if not array:
            return None  # (whitespace may go on to the array)
        at = len(self.buf) - len(array)
        if array[0] != "[":  # the tag with no array after it: text, and the text goes on
            return at, None
        self.end = self.end or _ObjectEnd()
        end = self.end.find(array)
        if end < 0:
            return None
        self.end = None
        return at + end, _array_calls(array[:end], self.tools)


def _json_value(value):
    """A Python literal's value as JSON's (a tuple as a list); ValueError where JSON has none (a set,
    bytes, a complex or non-finite number, a dict key that is not a string)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON")


def _pythonic_calls(text: str, tools) -> list[dict] | None:
    """A whole reply's pythonic calls ({"name", "arguments": JSON text} each), or None unless the
    reply (less surrounding whitespace and Llama 4's ``<|python_start|>`` / ``<|python_end|>``) is a
    non-empty Python list of calls of the tools by keyword arguments whose values are literals. Read
    with ``ast`` (nothing is run)."""
    body = text.strip()
    if body.startswith(PYTHON_START):
        body = body[len(PYTHON_START):].strip()
        if body.endswith(PYTHON_END):
            body = body[:-len(PYTHON_END)].strip()
    if not body.startswith("["):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in tools
                and not node.args):
            return None
        args: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None or kw.arg in args:  # (**kwargs; a keyword given twice)
                return None
            try:
                args[kw.arg] = _json_value(ast.literal_eval(kw.value))
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return None
        try:  # (as written where it can be: an escaped lone surrogate cannot be, so it stays escaped)
            out = json.dumps(args, ensure_ascii=False)
            out.encode("utf-8")
        except UnicodeEncodeError:
            out = json.dumps(args)
        except ValueError:  # (an int past Python's 4300-digit conversion limit)
            return None
        calls.append({"name": node.func.id, "arguments": out})
    return calls


class PythonicStream(_Stream):
    """A pythonic reply (the module docstring's rules): text that does not begin as a list of calls
    goes out as it comes; one that does is held and read whole when the reply ends."""

    @staticmethod
    def opening(name: str) -> str:  # (what a list's first call to ``name`` begins with; read whole, not streamed)
        return f"[{name}("

    def __init__(self, tools):
        super().__init__(tools)
        self.mode: str | None = None  # "calls" (may be a list of calls: held), "text", or None (not known yet)

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list[tuple[str, Any]] = []
        if self.mode is None:
            lead = self.buf.lstrip()
            if lead.startswith(("[", PYTHON_START)):
                self.mode = "calls"
            elif lead and not PYTHON_START.startswith(lead):
                self.mode = "text"
        if self.mode == "text" or (self.mode is None and not self.buf.strip()):  # (whitespace: held by _text)
            self._text(self.buf, events)
            self.buf = ""
        return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        calls = _pythonic_calls(self.buf, self.tools) if self.mode == "calls" else None
        if calls:
            for call in calls:
                self._call_made(("call", call), events)
        else:
            self._text(self.buf, events)
        if self.held and not self.called and (self.spoke or self.held.strip()):
            events.append(("content", self.held))
        self.buf, self.held, self.mode = "", "", None
        return events


STREAMS = {"hermes": HermesStream, "llama3_json": Llama3JsonStream, "mistral": MistralStream,
           "pythonic": PythonicStream}


def stream(parser: str, tools) -> _Stream:
    """A streamed reply's parser: ``parser`` one of ``PARSERS``, ``tools`` the request's names."""
    return STREAMS[parser](tools)


def calls_of(events) -> list[dict]:
    """The calls a stream's events make, {"name", "arguments"} each (a streamed one's pieces joined)."""
    calls: list[dict] = []
    for kind, value in events:
        if kind == "call":
            calls.append(dict(value))
        elif kind == "call_open":
            calls.append({"name": value, "arguments": ""})
        elif kind == "call_args":
            calls[-1]["arguments"] += value
    return calls


def split(text: str, tools, parser: str = "hermes") -> tuple[str | None, list[dict], bool]:
    """A finished reply's (content, calls, whether the reply ended inside a call's arguments, its
    last call then not whole JSON): the module docstring's rules."""
    s = stream(parser, tools)
    events = s.feed(text) + s.finish()
    content = "".join(t for kind, t in events if kind == "content")
    return (content or None), calls_of(events), any(kind == "cut" for kind, _ in events)


def parse(text: str, tools, parser: str = "hermes") -> tuple[str | None, list[dict]]:
    """A finished reply's (content, calls): the module docstring's rules."""
    return split(text, tools, parser)[:2]
