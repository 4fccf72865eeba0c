"""The OpenAI-compatible request bodies (pydantic) and the OpenAI-shaped error body.

Declared here is what the server implements: OpenAI's sampling fields (``temperature``, ``top_p``,
``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``max_tokens`` /
``max_completion_tokens``, ``n``, ``echo``) and vLLM's extensions with vLLM's meaning
(``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``,
``allowed_token_ids``, ``ignore_eos``). Log-probabilities: ``logprobs: k`` (completions) and
``logprobs: true`` with ``top_logprobs: k`` (chat), k <= 20. Structured output, one constraint per
request (``structured()``; served by ``structured.py``): OpenAI's ``response_format`` (``json_object``,
``json_schema``; vLLM's ``structural_tag``), vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` and ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``,
``structural_tag``, ``disable_any_whitespace``). Tool calls (chat): ``tools`` with ``tool_choice`` naming a function or
"required" become a JSON constraint on the call (vLLM's shapes; ``ChatRequest.tool_call``), "none"
a plain reply; "auto" (the default with tools) needs a server started with a tool-call parser
(``--enable-auto-tool-choice --tool-call-parser hermes``, ``llama3_json``, ``mistral`` or ``pythonic``: text and
calls, the calls held to the tools by a structural tag, pythonic's unconstrained; ``tool_parsers.py``), else it is
refused, as vLLM does. vLLM's ``prompt_logprobs`` (k <= 20,
not streamed; ``prompt_logprobs_k``), ``include_stop_str_in_output``, ``skip_special_tokens``,
``truncate_prompt_tokens``, ``bad_words`` and chat's ``add_generation_prompt``, ``continue_final_message`` and
``chat_template_kwargs`` (``ChatRequest.template_options``). A field that would change the result
and is not supported (``n`` > 16, ``prompt_logprobs`` -1, ``best_of``,
``guided_whitespace_pattern``, beam search, ...)
is refused with a 400 naming it, never silently dropped; a field given with the value that asks
for nothing (null, false, the default) is accepted. Fields known to leave the output alone
(``user``, ``metadata``, ``store``, ...) are accepted; any other field is accepted and ignored, and
the server logs its name once (``ignored_fields``), as vLLM does.
Numbers and strings are strict: a string where a number belongs is a 400, not coerced; a string
that is not valid Unicode (a lone UTF-16 surrogate, which JSON's ``\\ud800`` escapes can carry) is
a 400 too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt,
                      StrictStr, field_validator)

__all__ = ["CompletionRequest", "ChatRequest", "LoadAdapterRequest", "UnloadAdapterRequest", "error_body",
           "TokenizeRequest", "DetokenizeRequest",
           "ErrorResponse", "Limits"]

Number = Union[StrictInt, StrictFloat]
MAX_N = 16  # choices per request (each one engine request)
# sampling.SamplingParams.MAX_LOGPROBS, restated: this module must not import torch (`serve --help`
# stays light); tests/serving/test_sampling_features.py checks the two agree
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    """Per-request limits (``fastadapters serve`` exposes each as a flag, with these defaults)."""
    max_request_bytes: int = 2 << 20  # a JSON body (413 beyond)
    max_header_bytes: int = 16 << 10  # all request headers together (431 beyond)
    body_timeout: float = 30.0  # seconds to receive a whole body, from the headers on (408 beyond)
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 64  # characters per stop string (the per-token stop check is ~ strings x chars)
    stall_seconds: float = 120.0  # /health is 503 when no engine step completed this long with work waiting


def _unicode(value):
    """``value`` unchanged if every string in it encodes as UTF-8; ValueError otherwise."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode: a lone surrogate {value[e.start]!a} at character {e.start}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _unicode(k)
            _unicode(v)
    elif isinstance(value, list):
        for v in value:
            _unicode(v)
    return value


Text = Annotated[StrictStr, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # (vLLM's; with include_usage) each chunk: its choice's usage so far


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text | None = None  # (vLLM's: null, left out or "" names the base model)
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: Text | list[Text] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    ignore_eos: StrictBool = False
    user: Text | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    min_p: Number | None = None
    min_tokens: StrictInt | None = None
    logit_bias: dict[Text, Number] | None = None
    stop_token_ids: list[StrictInt] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    bad_words: list[Text] | None = None  # (vLLM's) words the output may not contain, tokenised by the server
    skip_special_tokens: StrictBool = True
    truncate_prompt_tokens: StrictInt | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    prompt_logprobs: StrictInt | None = None  # (vLLM's) each prompt token's log-probability, rank and top k
    # structured output (one of them; ``structured()``)
    response_format: Annotated[dict[str, Any], AfterValidator(_unicode)] | None = None
    guided_json: Annotated[dict[str, Any] | StrictStr, AfterValidator(_unicode)] | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    structured_outputs: Annotated[dict[str, Any], AfterValidator(_unicode)] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a field this server cannot honour; None if there is none."""
        if not 1 <= self.n <= MAX_N:
            return "n", f"n: got {self.n}; valid: an integer in [1, {MAX_N}] (choices per request)"
        extra = self.model_extra or {}
        for key, asks_nothing in UNSUPPORTED.items():
            if key not in extra:
                continue
            value = extra[key]
            if value is None or asks_nothing(value):
                continue
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            return key, f"{key} is not supported by this server (got {shown}); omit it or send null"
        return None

    def prompt_logprobs_k(self) -> int | None:
        """vLLM's ``prompt_logprobs`` k, checked as vLLM checks it (refused with ``stream`` when k > 0;
        0 with ``stream`` asks for nothing there); None when not asked. -1 (vLLM: the whole vocabulary)
        is refused: at most MAX_TOP_LOGPROBS, as every other top-k here."""
        k = self.prompt_logprobs
        if k is None:
            return None
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise ValueError(f"prompt_logprobs: got {k}; valid: an integer in [0, {MAX_TOP_LOGPROBS}] (-1, the "
                             "whole vocabulary, is not supported)")
        if self.stream:
            if k > 0:
                raise ValueError("prompt_logprobs: `prompt_logprobs` are not available when `stream=True` "
                                 "(as in vLLM); valid: without stream, or 0")
            return None
        return k

    def ignored(self) -> list[str]:
        """The names of this body's fields that the server neither uses nor knows to be harmless."""
        return [k for k in (self.model_extra or {}) if k not in UNSUPPORTED and k not in HARMLESS]

    def structured(self) -> Structured | None:
        """The structured-output constraint the body asks for (None: none); ValueError names a field
        whose value is not a valid constraint, or two fields that both constrain the output."""
        found: list[Structured] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            fields = {"json_schema": {"type", "json_schema"}, "structural_tag": {"type", "format"} if "format" in rf
                      else {"type", "structures", "triggers"}}.get(kind, {"type"})
            extra = sorted(set(rf) - fields)
            if extra:  # e.g. llama.cpp's {"type": "json_object", "schema": ...}: never dropped silently
                raise ValueError(f"response_format: {_shown(extra[0])} is not a field of type {_shown(kind)}; valid: "
                                 "{\"type\": \"json_object\"}, {\"type\": \"json_schema\", \"json_schema\": "
                                 "{\"name\": ..., \"schema\": {...}}} or {\"type\": \"structural_tag\", \"format\": "
                                 "{...}} (or its older \"structures\" and \"triggers\")")
            if kind == "json_object":
                found.append(Structured("response_format", "json_object"))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict):
                    raise ValueError("response_format: json_schema: valid: an object {\"name\": ..., \"schema\": {...}}")
                unknown = sorted(set(js) - {"name", "description", "schema", "strict"})
                if unknown:  # a misspelt "schema" would otherwise mean any object
                    raise ValueError(f"response_format: json_schema has {_shown(unknown[0])}; valid fields: name, "
                                     "description, schema, strict")
                schema = js.get("schema")
                if schema is None:  # OpenAI: a schema-less json_schema is any JSON object
                    found.append(Structured("response_format", "json_object"))
                else:
                    found.append(Structured("response_format", "json", _schema_text(schema, "response_format")))
            elif kind == "structural_tag":  # vLLM's: the whole object is the tag's JSON (xgrammar reads it)
                found.append(Structured("response_format", "structural_tag", _schema_text(rf, "response_format")))
            elif kind != "text":
                raise ValueError(f"response_format: type {_shown(kind)}; valid: 'text', 'json_object', 'json_schema', "
                                 "'structural_tag'")
        if self.guided_json is not None:
            found.append(Structured("guided_json", "json", _schema_text(self.guided_json, "guided_json")))
        if self.guided_regex is not None:
            found.append(Structured("guided_regex", "regex", self.guided_regex))
        if self.guided_choice is not None:
            found.append(Structured("guided_choice", "choice", choices=tuple(self.guided_choice)))
        if self.guided_grammar is not None:
            found.append(Structured("guided_grammar", "grammar", self.guided_grammar))
        so = self.structured_outputs
        if so is not None:
            unknown = sorted(k for k in so if k not in _SO_KINDS and k not in _SO_OPTIONS)
            if unknown:
                raise ValueError(f"structured_outputs: {_shown(unknown[0])} is not supported; valid keys: "
                                 f"{', '.join(_SO_KINDS + tuple(sorted(_SO_OPTIONS)))}")
            for key in _SO_OPTIONS:
                value = so.get(key)
                if value is not None and not isinstance(value, _SO_OPTIONS[key]):
                    raise ValueError(f"structured_outputs: {key}: got {_shown(value)}; valid: "
                                     f"{_SO_OPTIONS[key].__name__} or null")
            ws = not so.get("disable_any_whitespace")
            for key in _SO_KINDS:
                value = so.get(key)
                if value is None or value is False:
                    continue
                where = f"structured_outputs.{key}"
                if key == "json":
                    found.append(Structured(where, "json", _schema_text(value, where), any_whitespace=ws))
                elif key == "json_object":
                    if value is not True:
                        raise ValueError(f"{where}: got {_shown(value)}; valid: true or null")
                    found.append(Structured(where, "json_object", any_whitespace=ws))
                elif key == "choice":
                    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                        raise ValueError(f"{where}: valid: a list of strings")
                    found.append(Structured(where, "choice", choices=tuple(value)))
                else:
                    if not isinstance(value, str):
                        raise ValueError(f"{where}: got {_shown(value)}; valid: a string")
                    found.append(Structured(where, key, value))
        found += self._more_constraints()
        if len(found) > 1:
            raise ValueError(f"{found[0].source}: only one structured-output constraint per request; this one also "
                             f"has {found[1].source}")
        return found[0] if found else None

    def _more_constraints(self) -> list[Structured]:
        return []

    def token_bias(self) -> dict[int, float]:
        """``logit_bias`` with integer token ids (OpenAI sends them as strings); ValueError names a bad key."""
        out = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                out[int(k)] = float(v)
            except ValueError:
                shown = repr(k) if len(k) <= 40 else repr(k[:40]) + "..."
                raise ValueError(f"logit_bias: key {shown} is not a token id; valid: token ids as decimal "
                                 "strings, e.g. {\"50256\": -100}") from None
        return out


@dataclass(frozen=True)
class Structured:
    """A structured-output constraint as sent (the engine's ``StructuredSpec`` is made from it)."""
    source: str  # the field it came from
    kind: str  # json | json_object | regex | choice | grammar | structural_tag
    value: str = ""
    choices: tuple[str, ...] = ()
    any_whitespace: bool = True


_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")  # vLLM's structured_outputs
# (the backend is always xgrammar; there is no fallback to disable)
# (disable_additional_properties: xgrammar's strict mode already allows no properties beyond the
# schema's unless it says so, vLLM's behaviour on xgrammar either way)
_SO_OPTIONS = {"disable_any_whitespace": bool, "backend": str, "disable_fallback": bool,
               "disable_additional_properties": bool}


def _shown(value) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:40] + "..."


def _schema_text(schema, where: str) -> str:
    """A JSON schema given as an object or as its JSON text, as text; ValueError names ``where``."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{where}: the schema is not valid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"{where}: the schema is nested too deeply to read") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"{where}: got {_shown(schema)}; valid: a JSON schema (an object)")
    try:  # compact and unescaped: the size limit counts what was sent, not \uXXXX escapes
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise ValueError(f"{where}: the schema is nested too deeply to read") from None


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _params_schema(params: dict | None) -> dict:
    return params if params else {"type": "object", "properties": {}}


# apply_chat_template's own arguments: a client's chat_template_kwargs may not set them
_TEMPLATE_RESERVED = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                      "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def _false(v):
    return v is False


def _empty(v):
    return v == [] or v == {} or v == ""


# fields that change the result and that this server does not implement -> does this value ask
# for nothing (then the request is served; None always does)
UNSUPPORTED = {
    "logprobs": _false, "top_logprobs": lambda v: type(v) is int and v == 0,  # undeclared only
    "echo": _false, "suffix": _empty, "tools": _empty, "functions": _empty, "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v in ("none", "auto"),
    "best_of": lambda v: type(v) is int and v == 1, "use_beam_search": _false,
    "guided_whitespace_pattern": _empty, "structural_tag": _empty,
    "spaces_between_special_tokens": lambda v: v is True, "chat_template": _empty,
    "modalities": lambda v: v == ["text"], "audio": lambda v: False,
}
# fields that leave the output alone (bookkeeping, hints, options of features not asked for)
HARMLESS = {"metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "priority", "request_id",
            "length_penalty", "stream_options", "reasoning_effort", "web_search_options",
            "cache_salt", "return_tokens_as_token_ids", "guided_decoding_backend"}


class CompletionRequest(_Sampling):
    prompt: Text | list[StrictInt] | list[Text] | list[list[StrictInt]]
    logprobs: StrictInt | None = None  # the top k log-probabilities per token (OpenAI's legacy form)
    echo: StrictBool | None = None  # the prompt before the completion (and its log-probabilities, with logprobs)

    def logprobs_k(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Text
    content: Text | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _content_unicode(cls, v):
        return _unicode(v)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    # tool calls: a named function or "required" (the reply is constrained to the call's JSON), or "none"
    tools: list[Annotated[dict[str, Any], AfterValidator(_unicode)]] | None = None
    tool_choice: Text | Annotated[dict[str, Any], AfterValidator(_unicode)] | None = None
    parallel_tool_calls: StrictBool | None = None
    # the chat template's options (vLLM's)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(_unicode)] | None = None
    # vLLM's: the reply's content starts with the last message's when that message has the reply's
    # role (the assistant's, or with add_generation_prompt false any: the reply continues it)
    echo: StrictBool | None = None
    # the server's parser of tool calls in a free-form reply (tool_parsers.PARSERS), set by the server
    # before the body is read further: None refuses tool_choice "auto"
    _tool_parser: str | None = PrivateAttr(default=None)

    def template_options(self) -> dict:
        """Keyword arguments for ``apply_chat_template``; ValueError names a bad combination or key."""
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message: true needs add_generation_prompt: false (the reply continues "
                             "the last message instead of starting a new one)")
        extra = dict(self.chat_template_kwargs or {})
        reserved = sorted(k for k in extra if k in _TEMPLATE_RESERVED)
        if reserved:
            raise ValueError(f"chat_template_kwargs: {_shown(reserved[0])} is set by the server; valid: the "
                             "template's own variables (e.g. enable_thinking)")
        if self.tools:
            extra["tools"] = self.tools
        return {**extra, "add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message}

    def _tool_params(self) -> dict[str, dict | None]:
        """``tools`` checked: function name -> its parameters' JSON schema (None: none given)."""
        out: dict[str, dict | None] = {}
        for i, tool in enumerate(self.tools or []):
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict):
                raise ValueError(f"tools[{i}]: valid: {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                 "\"parameters\": {...}}}")
            name, params = fn.get("name"), fn.get("parameters")
            if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
                raise ValueError(f"tools[{i}]: function name {_shown(name)}; valid: 1 to 64 letters, digits, _ or -")
            if name in out:
                raise ValueError(f"tools[{i}]: a second function named {name!r}")
            if params is not None and not isinstance(params, dict):
                raise ValueError(f"tools[{i}]: parameters of {name!r}: valid: a JSON schema (an object) or null")
            out[name] = params
        return out

    def tool_call(self) -> tuple[str, str | None] | None:
        """("named", name) or ("required", None) when the reply must be a tool call, ("auto", parser)
        when it may hold calls among its text; None for a plain reply. ValueError names a bad
        ``tools`` / ``tool_choice``."""
        tools, choice = self._tool_params(), self.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise ValueError(f"tool_choice: got {_shown(choice)} without tools; valid: tools to choose from")
            return None
        if choice == "none":
            return None
        if choice is None or choice == "auto":
            if self._tool_parser is not None:
                return "auto", self._tool_parser
            raise ValueError("tool_choice: 'auto' (the default when tools are given) needs a server started with "
                             "--enable-auto-tool-choice --tool-call-parser hermes (or llama3_json, mistral, pythonic: a "
                             "parser for tool calls in a free-form reply); valid here: 'required', a named function {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}, or 'none'")
        if choice == "required":
            return "required", None
        fn = choice.get("function") if isinstance(choice, dict) else None
        if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise ValueError(f"tool_choice: got {_shown(choice)}; valid: 'none', 'required', or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if fn["name"] not in tools:
            raise ValueError(f"tool_choice: the function {_shown(fn['name'])} is not among tools")
        return "named", fn["name"]

    def _more_constraints(self) -> list[Structured]:
        """A tool call's JSON as a constraint: a named function's parameters, or for "required" an
        array of {"name", "parameters"} objects, one of the tools each (vLLM's shapes)."""
        call = self.tool_call()
        if call is None:
            return []
        tools = self._tool_params()
        if call[0] == "auto":  # text, and calls held to the tools (a stop string may cut one's close: it is whole)
            from .tool_parsers import constraint
            params = {}
            for i, (name, p) in enumerate(tools.items()):
                schema = _params_schema(p)
                if schema.get("type") != "object":  # the format's arguments are an object
                    raise ValueError(f"tools[{i}]: parameters of {name!r} have type {_shown(schema.get('type'))}; "
                                     "valid with tool_choice 'auto': a schema of type \"object\" (a call's "
                                     "arguments are an object)")
                params[name] = json.loads(_schema_text(schema, f"tools[{i}]"))
            source = "tool_choice" if self.tool_choice is not None else "tools"  # ("auto" sent, or by default)
            tag = constraint(params, self.parallel_tool_calls is not False, call[1])
            return [Structured(source, "structural_tag", tag)] if tag is not None else []  # (pythonic: none)
        for name in ("stop", "stop_token_ids"):
            if getattr(self, name):  # a cut call would read as a finished one (finish_reason "stop")
                raise ValueError(f"{name}: not with tool_choice {_shown(self.tool_choice)}: it could cut the call's "
                                 "JSON short; the call ends when its JSON is complete")
        if call[0] == "named":
            return [Structured("tool_choice", "json", _schema_text(_params_schema(tools[call[1]]), "tool_choice"))]
        defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}  # (2020-12's and draft 7's)
        items = []
        for name, params in tools.items():
            params = dict(_params_schema(params))
            for where in defs:  # moved to the top, where the tools' "#/$defs/..." references now point
                got = params.pop(where, None) or {}
                if not isinstance(got, dict):
                    raise ValueError(f"tools: {where} of {name!r}: valid: an object of schemas")
                for key, schema in got.items():
                    if key in defs[where] and defs[where][key] != schema:
                        raise ValueError(f"tools: two different schemas named {key!r} in {where}")
                    defs[where][key] = schema
            items.append({"properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                          "required": ["name", "parameters"]})
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        schema.update({where: d for where, d in defs.items() if d})
        return [Structured("tool_choice", "json", _schema_text(schema, "tool_choice"))]

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(f"top_logprobs: got {self.top_logprobs}; valid: only with logprobs: true")
        top = MAX_TOP_LOGPROBS
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= top:
            raise ValueError(f"top_logprobs: got {self.top_logprobs}; valid: an integer in [0, {top}]")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a prompt (as completions reads it) or chat messages (as chat renders
    them), to token ids."""
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: StrictBool = True  # (a prompt's: the tokenizer's BOS etc.)
    add_generation_prompt: StrictBool = True  # (messages': as chat does by default)
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``: token ids to text."""
    model: Text | None = None
    tokens: list[StrictInt]


class LoadAdapterRequest(BaseModel):
    lora_name: Text
    lora_path: Text


class UnloadAdapterRequest(BaseModel):
    lora_name: Text
    lora_int_id: StrictInt | None = None


ErrorType = Literal["invalid_request_error", "not_found_error", "permission_error", "server_error",
                    "service_unavailable", "rate_limit_error", "authentication_error"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error the server sends (OpenAI's shape; ``code`` is the HTTP status)."""
    error: ErrorDetail


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
