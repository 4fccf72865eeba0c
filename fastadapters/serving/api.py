"""The OpenAI-compatible HTTP server over an ``Engine``: FastAPI routes, SSE streaming, errors.

    app = create_app(engine, served_model_name="smollm2", base_path="models/smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` sends server-sent events ending in
``data: [DONE]``), ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's
payloads, any adapter type). A request's ``model`` is the served base name or an adapter name.
Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 bad input, 403 a load
from outside the adapter roots, 404 an unknown model, 503 a full queue. A client that goes away
(closed stream or connection) has its request aborted, which frees its KV blocks.

This module holds no model logic: tokenising, the chat template and response shapes only.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterError, PathNotAllowed, UnknownAdapter
from .engine import PromptError, QueueFull
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, error_body
from .sampling import SamplingParams

__all__ = ["create_app", "APIError"]

DISCONNECT_POLL_S = 0.25
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, status, param), status_code=status)


def _api_error(e: Exception) -> APIError:
    """The HTTP status and OpenAI error type of an engine exception."""
    if isinstance(e, UnknownAdapter):
        return APIError(404, str(e), "not_found_error", "model")
    if isinstance(e, PathNotAllowed):
        return APIError(403, str(e), "permission_error", "lora_path")
    if isinstance(e, QueueFull):
        return APIError(503, str(e), "service_unavailable")
    if isinstance(e, (AdapterError, PromptError, ValueError)):
        return APIError(400, str(e), "invalid_request_error")
    return APIError(500, f"{type(e).__name__}: {e}", "server_error")


def create_app(engine, served_model_name: str, base_path: str | None = None, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. ``manage_engine``: start the engine thread with the app, stop it at shutdown."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("the HTTP server needs the engine to have a tokenizer")
    metrics = ServerMetrics(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await run_in_threadpool(engine.stop)

    app = FastAPI(title="fastadapters serve", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        metrics.http.labels(path if path in ROUTES else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, e: RequestValidationError):
        parts, param = [], None
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (".".join(loc) or None)
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        return _error_response(400, "invalid request: " + "; ".join(parts), "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404
                               else "invalid_request_error")

    @app.get("/health")
    async def health():
        if not engine.healthy():
            return _error_response(503, "the engine thread stopped", "server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models():
        cards = [{"id": served_model_name, "object": "model", "created": created, "owned_by": "fastadapters",
                  "root": base_path or served_model_name, "parent": None}]
        for e in engine.adapters():
            cards.append({"id": e.name, "object": "model", "created": e.created, "owned_by": "fastadapters",
                          "root": e.path, "parent": served_model_name, "adapter_type": e.adapter_type})
        return {"object": "list", "data": cards}

    def adapter_of(model: str) -> str | None:
        if model == served_model_name:
            return None
        if model not in engine.registry.entries:
            raise APIError(404, f"the model {model!r} does not exist; served: "
                                f"{[served_model_name] + engine.registry.names()}", "not_found_error", "model")
        return model

    def sampling(body, max_default: int) -> SamplingParams:
        bad = body.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0])
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        params = SamplingParams(max_tokens=max_default if max_tokens is None else max_tokens,
                                temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p,
                                top_k=0 if body.top_k is None else body.top_k, seed=body.seed, stop=stop,
                                ignore_eos=body.ignore_eos)
        try:
            params.validate()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from None
        return params

    def completion_ids(body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: got a batch of {len(p)} prompts; send one prompt per request",
                               param="prompt")
            p = p[0]
        if isinstance(p, str):
            return list(tokenizer(p)["input_ids"])
        return list(p)

    def chat_ids(body: ChatRequest) -> list[int]:
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: text only
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages: content part {part.get('type')!r} is not supported; "
                                            "valid: text parts", param="messages")
                    texts.append(part["text"])
                content = "".join(texts)
            messages.append({"role": m.role, "content": content or ""})
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def run(request: Request, body, ids: list[int], params: SamplingParams, chat: bool):
        adapter = adapter_of(body.model)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            engine.submit(ids, params, adapter=adapter, request_id=rid,
                          on_output=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except Exception as e:
            raise _api_error(e) from None
        if body.stream:
            return StreamingResponse(_stream(request, body, rid, queue, chat), media_type="text/event-stream")
        text, reason, usage = [], None, None
        try:
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.abort(rid)
                        return Response(status_code=499)
                    continue
                text.append(out.text)
                if out.finished:
                    reason, usage = out.finish_reason, _usage(out)
                    if reason == "error":
                        raise APIError(500, f"generation failed: {out.error}", "server_error")
                    if reason == "abort":
                        raise APIError(503, "the request was aborted (the server is shutting down)",
                                       "service_unavailable")
                    break
        finally:
            if reason is None:
                engine.abort(rid)  # cancelled (client gone) or failed: free its blocks
        now = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                      "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": reason}
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [choice], "usage": usage}

    async def _stream(request: Request, body, rid: str, queue: asyncio.Queue, chat: bool):
        now = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        finished = False

        def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            data = {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if out.finished:
                    finished = True
                    if out.finish_reason in ("error", "abort"):
                        err = error_body(f"generation failed: {out.error or out.finish_reason}", "server_error", 500)
                        yield f"data: {json.dumps(err)}\n\n"
                    else:
                        yield chunk(out.text, out.finish_reason)
                        if include_usage:
                            data = {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [],
                                    "usage": _usage(out)}
                            yield f"data: {json.dumps(data)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if out.text:
                    yield chunk(out.text, None)
        finally:
            if not finished:
                engine.abort(rid)  # the client went away mid-stream: free the request's blocks

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        ids = completion_ids(body)
        return await run(request, body, ids, sampling(body, 16), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        ids = chat_ids(body)
        return await run(request, body, ids, sampling(body, max(1, engine.max_model_len - len(ids) - 1)), chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        if body.lora_name == served_model_name:
            raise APIError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
        try:
            await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        except Exception as e:
            raise _api_error(e) from None
        return PlainTextResponse(f"Success: adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        try:
            await run_in_threadpool(engine.unload_adapter, body.lora_name)
        except Exception as e:
            raise _api_error(e) from None
        return PlainTextResponse(f"Success: adapter '{body.lora_name}' removed successfully.")

    return app


def _usage(out) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}
