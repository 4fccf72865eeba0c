"""The OpenAI-compatible request bodies (pydantic) and the OpenAI-shaped error body.

Only what the server implements is declared; other OpenAI fields are accepted and ignored, except
those that would change the result and are not supported (``n`` > 1, ``logprobs``, ``best_of``),
which are refused with a 400 rather than silently dropped. Numbers and strings are strict: a
string where a number belongs is a 400, not coerced. ``top_k`` and ``ignore_eos`` are vLLM's
extensions, with vLLM's meaning.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

__all__ = ["CompletionRequest", "ChatRequest", "LoadAdapterRequest", "UnloadAdapterRequest", "error_body"]

Number = Union[StrictInt, StrictFloat]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    ignore_eos: StrictBool = False
    user: StrictStr | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a field this server cannot honour; None if there is none."""
        if self.n != 1:
            return "n", f"n: got {self.n}; this server returns one choice per request (n = 1)"
        extra = self.model_extra or {}
        for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "best_of"):
            value = extra.get(key)
            if value in (None, False, "") or (key == "best_of" and value == 1):
                continue
            return key, f"{key} is not supported by this server (got {value!r})"
        return None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


class LoadAdapterRequest(BaseModel):
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadAdapterRequest(BaseModel):
    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


ErrorType = Literal["invalid_request_error", "not_found_error", "permission_error", "server_error",
                    "service_unavailable", "rate_limit_error"]


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
