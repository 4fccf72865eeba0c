"""The OpenAI-compatible request bodies (pydantic) and the OpenAI-shaped error body.

Only what the server implements is declared; other OpenAI fields are accepted and ignored, except
those that would change the result and are not supported (``n`` > 1, ``logprobs``, ``best_of``),
which are refused with a 400 rather than silently dropped (``logprobs: 0`` included: it asks for
the sampled token's log-probability). Numbers and strings are strict: a string where a number
belongs is a 400, not coerced; a string that is not valid Unicode (a lone UTF-16 surrogate, which
JSON's ``\\ud800`` escapes can carry) is a 400 too. ``top_k`` and ``ignore_eos`` are vLLM's
extensions, with vLLM's meaning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      field_validator)

__all__ = ["CompletionRequest", "ChatRequest", "LoadAdapterRequest", "UnloadAdapterRequest", "error_body",
           "ErrorResponse", "Limits"]

Number = Union[StrictInt, StrictFloat]


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


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
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

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a field this server cannot honour; None if there is none."""
        if self.n != 1:
            return "n", f"n: got {self.n}; this server returns one choice per request (n = 1)"
        extra = self.model_extra or {}
        for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "best_of"):
            if key not in extra:
                continue
            value = extra[key]
            if value is None or value is False or (key == "suffix" and value == "") \
                    or (key in ("tools", "functions") and value == []) \
                    or (key in ("best_of", "top_logprobs") and type(value) is int and value == (key == "best_of")):
                continue  # the value that asks for nothing
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            return key, f"{key} is not supported by this server (got {shown}); omit it or send null"
        return None


class CompletionRequest(_Sampling):
    prompt: Text | list[StrictInt] | list[Text] | list[list[StrictInt]]


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
