"""The OpenAI-compatible HTTP server over an ``Engine``: FastAPI routes, SSE streaming, errors.

    app = create_app(engine, served_model_name="smollm2", base_path="models/smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` sends server-sent events ending in
``data: [DONE]``), ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's
payloads, any adapter type). A request's ``model`` is the served base name or an adapter name (left
out, null or empty: the base, as vLLM reads it).
Every error, an unhandled one included, is ``{"error": {"message", "type", "param", "code"}}``:
400 bad input, 401 a missing / wrong API key, 403 a load from outside the adapter roots (or an
admin route on an open server), 404 an unknown model, 408 a body sent too slowly, 413 a body over
the limit, 431 headers over the limit, 503 a full queue or an unhealthy engine. ``/openapi.json``
documents exactly these.

Guarding (``_Guard``, a plain ASGI middleware, so nothing sits between a route and the client's
disconnect): header and body size limits, a body read timeout, Bearer-key checks on ``/v1/*``,
the per-route HTTP counter and a one-line access log per request. The guard reads the body before
the route runs and then watches the connection: a client that goes away (streaming or not) aborts
its request at once, which frees its KV blocks at the engine's next step. Tokenising and the chat
template run in one worker thread, never on the event loop, after a cheap length bound.

This module holds no model logic: tokenising, the chat template and response shapes only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterError, PathNotAllowed, UnknownAdapter, show
from .engine import EngineBusy, PromptError, QueueFull
from .metrics import ServerMetrics
from .protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, Limits, LoadAdapterRequest,
                       TokenizeRequest, UnloadAdapterRequest, _unicode, error_body)
from .sampling import NO_TOKEN, SamplingParams
from .structured import StructuredSpec
from .tool_parsers import PARSERS, call_id, split as split_tools, stream as tool_stream, tags_are_special

__all__ = ["create_app", "APIError", "Limits"]

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
          "/v1/unload_lora_adapter")
ACCESS_LOG = logging.getLogger("fastadapters.serve.access")
LOG = logging.getLogger("fastadapters.serve")
MAX_IGNORED_LOGGED = 256  # distinct unknown field names logged (a client can send any number)
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 64, 64  # bad_words per request, characters per word
_WATCH, _LOG = "fastadapters.disconnect", "fastadapters.log"
_GONE = object()  # queued when the client went away


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _json_error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    # ascii-escaped: a message can never fail to encode, whatever it quotes
    body = json.dumps(error_body(message, type_, status, param), ensure_ascii=True).encode()
    return Response(body, status_code=status, media_type="application/json")


def _api_error(e: Exception) -> APIError:
    """The HTTP status and OpenAI error type of an engine exception."""
    if isinstance(e, UnknownAdapter):
        return APIError(404, str(e), "not_found_error", "model")
    if isinstance(e, PathNotAllowed):
        return APIError(403, str(e), "permission_error", "lora_path")
    if isinstance(e, (QueueFull, EngineBusy)):
        return APIError(503, str(e), "service_unavailable")
    if isinstance(e, (AdapterError, PromptError, ValueError)):
        param = "max_tokens" if str(e).startswith("max_tokens") else None
        return APIError(400, str(e), "invalid_request_error", param)
    return APIError(500, f"{type(e).__name__}: {e}", "server_error")


class _Watch:
    """A connection's disconnect: callbacks run (on the event loop) when the client goes away."""

    def __init__(self):
        self.event = asyncio.Event()
        self.callbacks: list = []

    def add(self, fn) -> None:
        if self.event.is_set():
            fn()
        else:
            self.callbacks.append(fn)

    def discard(self, fn) -> None:
        if fn in self.callbacks:
            self.callbacks.remove(fn)

    def fire(self) -> None:
        self.event.set()
        callbacks, self.callbacks = self.callbacks, []
        for fn in callbacks:
            fn()


class _Guard:
    """Plain ASGI middleware: limits, auth, body buffering + disconnect watch, counter, access log."""

    def __init__(self, app, limits: Limits, metrics: ServerMetrics, api_key: str | None):
        self.app, self.limits, self.metrics, self.api_key = app, limits, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        info = {"id": "-", "model": None, "adapter": None, "prompt_tokens": 0, "completion_tokens": 0,
                "finish": None}
        scope[_LOG] = info
        state = {"status": 0}

        async def send_seen(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def reject(status: int, message: str, type_: str):
            await _json_error(status, message, type_)(scope, receive, send_seen)

        lim = self.limits
        try:
            headers = scope.get("headers") or []
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if size > lim.max_header_bytes:
                return await reject(431, f"the request headers hold {size} bytes; valid: at most "
                                         f"{lim.max_header_bytes} (--max-header-bytes)", "invalid_request_error")
            if self.api_key is not None and scope["path"].startswith(_KEYED) and scope["method"] != "OPTIONS":
                auth = next((v for k, v in headers if k == b"authorization"), b"")
                # raw bytes against the key's UTF-8 bytes: no lossy re-encoding that maps characters to '?'
                if not hmac.compare_digest(auth, b"Bearer " + self.api_key.encode("utf-8")):
                    return await reject(401, "a valid API key is needed: send the header 'Authorization: Bearer "
                                             "<key>' (the key the server was started with)", "authentication_error")
            length = next((v for k, v in headers if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > lim.max_request_bytes:
                return await reject(413, f"the request body has {int(length)} bytes; valid: at most "
                                         f"{lim.max_request_bytes} (--max-request-bytes)", "invalid_request_error")
            body, more = bytearray(), True
            deadline = time.monotonic() + lim.body_timeout  # a whole-body deadline: a trickle cannot hold on
            while more:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    return await reject(408, f"the request body did not arrive within {lim.body_timeout:g} s",
                                        "invalid_request_error")
                if message["type"] == "http.disconnect":
                    state["status"] = 499  # the client left before its body was complete
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > lim.max_request_bytes:
                    return await reject(413, f"the request body has more than {lim.max_request_bytes} bytes; "
                                             f"valid: at most {lim.max_request_bytes} (--max-request-bytes)",
                                        "invalid_request_error")
            watch = _Watch()
            scope[_WATCH] = watch
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                await watch.event.wait()
                return {"type": "http.disconnect"}

            async def watch_connection():
                while (await receive())["type"] != "http.disconnect":
                    pass
                watch.fire()

            watcher = asyncio.ensure_future(watch_connection())
            try:
                await self.app(scope, replay, send_seen)
            finally:
                watcher.cancel()
        except BaseException:
            state["status"] = state["status"] or 500
            raise
        finally:
            path = scope["path"]
            status = state["status"] or 499
            self.metrics.http.labels(path if path in ROUTES else "other", str(status)).inc()
            if path != "/metrics" and path != "/health" or status >= 400:
                ACCESS_LOG.info(
                    "%s %s %s status=%d model=%s adapter=%s prompt_tokens=%d completion_tokens=%d finish=%s "
                    "latency_ms=%.1f", info["id"], scope["method"], path[:80], status,
                    "-" if info["model"] is None else show(info["model"], 60),
                    "-" if info["adapter"] is None else show(info["adapter"], 60), info["prompt_tokens"],
                    info["completion_tokens"], info["finish"] or "-", 1000 * (time.monotonic() - t0))


_ERRORS_ALL = {408: "the body did not arrive in time", 413: "the body is over the size limit",
               431: "the headers are over the size limit", 500: "an unexpected server error"}
_ERRORS = {  # what each route can answer besides 2xx (beyond _ERRORS_ALL; /v1/*: 401 too)
    "/health": {503: "the engine thread stopped or stalled"},
    "/v1/completions": {400: "bad input", 404: "unknown model", 503: "the queue is full"},
    "/v1/chat/completions": {400: "bad input", 404: "unknown model", 503: "the queue is full"},
    "/v1/load_lora_adapter": {400: "bad input or adapter", 403: "outside the adapter roots, or an open server",
                              503: "the engine is busy or stopped"},
    "/v1/unload_lora_adapter": {400: "bad input", 403: "an open server", 404: "unknown adapter",
                                503: "the engine is busy or stopped"},
    "/v1/models/{model}": {404: "unknown model"},
    "/tokenize": {400: "bad input", 404: "unknown model"},
    "/detokenize": {400: "bad input", 404: "unknown model"},
}
_KEYED = ("/v1/", "/tokenize", "/detokenize")  # the paths an --api-key guards
_CONTENT_200 = {"/metrics": "text/plain", "/v1/load_lora_adapter": "text/plain",
                "/v1/unload_lora_adapter": "text/plain"}


def _openapi(app: FastAPI, api_key: bool) -> dict:
    """FastAPI's schema with the status codes the server really sends (400, never 422)."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for sub, sub_schema in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas[sub] = sub_schema
    err = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            ok = responses.get("200")
            if ok is not None:
                if path in _CONTENT_200:
                    ok["content"] = {_CONTENT_200[path]: {"schema": {"type": "string"}}}
                elif path in ("/v1/completions", "/v1/chat/completions"):
                    ok["description"] = ("the completion; with stream: true, server-sent events (data: <chunk JSON>), "
                                         "ending with data: [DONE]")
                    ok["content"] = {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}
                elif path == "/health":
                    ok.pop("content", None)
            codes = {**_ERRORS_ALL, **_ERRORS.get(path, {})}
            if api_key and path.startswith(_KEYED):
                codes[401] = "a missing or wrong API key"
            for code, what in sorted(codes.items()):
                responses[str(code)] = {"description": what, "content": err}
    return schema


def create_app(engine, served_model_name: str, base_path: str | None = None, manage_engine: bool = True, *,
               limits: Limits | None = None, api_key: str | None = None, admin_needs_key: bool = False,
               max_adapter_bytes: int | None = None, shutdown_timeout: float = 30,
               tool_call_parser: str | None = None) -> FastAPI:
    """The FastAPI app. ``manage_engine``: start the engine thread with the app, stop it at shutdown
    (waiting ``shutdown_timeout`` s for the thread). ``api_key``: Bearer auth on ``/v1/*``.
    ``admin_needs_key``: the load / unload routes answer 403 unless an ``api_key`` is set (the CLI
    sets it when bound to a non-loopback address). ``max_adapter_bytes``: the size limit of a
    runtime-loaded adapter folder (None: ``adapters.default_max_adapter_bytes`` of the model).
    ``tool_call_parser``: a parser of ``tool_parsers.PARSERS`` for chat's ``tool_choice: "auto"``
    (None: "auto" is refused, as vLLM does without ``--enable-auto-tool-choice``)."""
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise ValueError(f"tool_call_parser: got {tool_call_parser!r}; valid: one of {', '.join(PARSERS)}, or None")
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("the HTTP server needs the engine to have a tokenizer")
    limits = limits or Limits()
    if max_adapter_bytes is None:
        from .adapters import default_max_adapter_bytes

        max_adapter_bytes = default_max_adapter_bytes(engine.model)
    metrics = ServerMetrics(engine)
    created = int(time.time())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    # a text prompt longer than this cannot fit the context, whatever its tokens (no token is longer)
    longest_token = max((len(t) for t in vocab), default=64)
    max_prompt_chars = engine.max_model_len * longest_token
    tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastadapters-tokenize")
    # grammars compile in a thread of their own: a slow one (bounded by the engine's
    # max_grammar_compile_s) holds up other structured requests, never the tokenising of the rest
    grammar_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastadapters-grammar")
    ignored_fields: set[str] = set()  # request fields this server ignored, each logged once
    token_texts: dict[int, str] = {}
    token_bytes_of: dict[int, list[int]] = {}
    byte_chars = _byte_level_chars(tokenizer)
    marker = _stripped_space_marker(tokenizer, vocab)
    special_tags = tool_call_parser is not None and tags_are_special(tokenizer, tool_call_parser)  # ("auto")

    def token_text(i: int) -> str:
        """One token's text, as it reads inside a text: ``decode([i])``, with the leading spaces a
        SentencePiece-style tokenizer drops from a lone token put back (as vLLM does), so that the
        tokens of a log-probability list add up to the text: a piece's leading "▁"s, and the space
        that the byte-fallback piece "<0x20>" is (Llama-2's decoder strips it, decoded alone, to "")."""
        t = token_texts.get(i)
        if t is None:
            t = tokenizer.decode([i], skip_special_tokens=False)
            if marker is not None:
                raw = tokenizer.convert_ids_to_tokens(i)
                if isinstance(raw, str):
                    lead = 1 if raw == "<0x20>" else len(raw) - len(raw.lstrip(marker))
                    missing = lead - (len(t) - len(t.lstrip(" ")))
                    t = " " * max(missing, 0) + t
            token_texts[i] = t
        return t

    def token_bytes(i: int) -> list[int]:
        """OpenAI's ``bytes`` of one token: its own UTF-8 bytes. A token that holds part of a
        character (its text alone is "\ufffd") has its bytes read from its vocabulary piece: the
        characters of a byte-level BPE piece each stand for one byte (SmolLM2, Llama 3, Qwen, GPT-2),
        a SentencePiece byte-fallback piece is "<0xNN>"; so the bytes of a reply's tokens, joined,
        are its text's."""
        got = token_bytes_of.get(i)
        if got is None:
            t, raw = token_text(i), None
            if "\ufffd" in t:
                piece = tokenizer.convert_ids_to_tokens(i)
                if isinstance(piece, str) and piece:
                    if byte_chars is not None and all(ch in byte_chars for ch in piece):
                        raw = bytes(byte_chars[ch] for ch in piece)
                    elif (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)) is not None:
                        raw = bytes([int(m.group(1), 16)])
            got = list(t.encode("utf-8") if raw is None else raw)
            token_bytes_of[i] = got
        return got

    def logprobs_body(entries: list, chat: bool, offset: list[int]) -> dict:
        """OpenAI's logprobs object (chat's or completions') for ``entries``, one (token id, its
        log-probability or None, [(id, log-probability) top k]) per token; ``offset``: the text offset
        so far (updated)."""
        if chat:
            def item(i, lp):
                t = token_text(i)
                return {"token": t, "logprob": lp, "bytes": token_bytes(i)}
            return {"content": [dict(item(i, lp), top_logprobs=[item(j, lq) for j, lq in top])
                                for i, lp, top in entries]}
        tokens, offsets = [], []
        for i, _, _ in entries:
            tokens.append(token_text(i))
            offsets.append(offset[0])
            offset[0] += len(tokens[-1])

        def top_dict(i, lp, top):  # keyed by text: tokens of one text (e.g. lone bytes, "\ufffd") keep the larger
            d = {}
            for j, lq in [*top, (i, lp)]:
                t = token_text(j)
                d[t] = max(d.get(t, lq), lq)
            return d

        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                # the k most likely and the chosen token (vLLM's and OpenAI's legacy form); None: a first prompt token
                "top_logprobs": [None if lp is None else top_dict(i, lp, top) for i, lp, top in entries],
                "text_offset": offsets}

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            tokenize_pool.shutdown(wait=False, cancel_futures=True)
            grammar_pool.shutdown(wait=False, cancel_futures=True)
            if manage_engine:
                await run_in_threadpool(engine.stop, shutdown_timeout)
            stats = engine.stats
            ACCESS_LOG.info("fastadapters serve: shut down; %d requests finished, %d aborted, %d failed",
                            sum(v for k, v in stats.items() if k.startswith("finished_")),
                            stats.get("finished_abort", 0), stats.get("finished_error", 0))

    app = FastAPI(title="fastadapters serve", lifespan=lifespan)
    app.state.engine = engine
    app.state.limits = limits
    app.state.ignored_fields = ignored_fields
    app.add_middleware(_Guard, limits=limits, metrics=metrics, api_key=api_key)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app, api_key is not None)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return _json_error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, e: RequestValidationError):
        parts, param = [], None
        for err in e.errors()[:8]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (".".join(loc)[:80] or None)
            parts.append(f"{'.'.join(loc)[:80] or 'body'}: {str(err.get('msg'))[:200]}")
        return _json_error(400, "invalid request: " + "; ".join(parts), "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, e: StarletteHTTPException):
        return _json_error(e.status_code, str(e.detail)[:200], "not_found_error" if e.status_code == 404
                           else "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_unhandled(request, e: Exception):
        return _json_error(500, f"internal error ({type(e).__name__}); the server keeps serving", "server_error")

    @app.get("/health")
    async def health():
        problem = engine.health(limits.stall_seconds)
        if problem is not None:
            return _json_error(503, problem, "service_unavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    def model_cards() -> list[dict]:
        cards = [{"id": served_model_name, "object": "model", "created": created, "owned_by": "fastadapters",
                  "root": base_path or served_model_name, "parent": None, "max_model_len": engine.max_model_len}]
        for e in engine.adapters():  # (max_model_len: null on an adapter's card, as vLLM's)
            cards.append({"id": e.name, "object": "model", "created": e.created, "owned_by": "fastadapters",
                          "root": e.path, "parent": served_model_name, "max_model_len": None,
                          "adapter_type": e.adapter_type})
        return cards

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        """OpenAI's model retrieval (``client.models.retrieve``); adapter names may hold a '/'."""
        adapter_of(model)  # 404 naming the served models
        return next(c for c in model_cards() if c["id"] == model)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        """vLLM's: a prompt or chat messages to token ids (what completions / chat would feed the
        model), with the context length, so a client can count before it sends."""
        adapter_of(named(body))
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "tokenize: give one of prompt or messages", param="prompt")
        if body.prompt is not None:
            check_chars(len(body.prompt), "prompt")
            ids = await off_loop(lambda: list(tokenizer(body.prompt,
                                                        add_special_tokens=body.add_special_tokens)["input_ids"]))
        else:
            chat = ChatRequest.model_construct(model=body.model, messages=body.messages)  # (validated already)
            options = {"add_generation_prompt": body.add_generation_prompt, "continue_final_message": False}
            ids = await off_loop(chat_ids, chat_messages(chat), options)
        out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = await off_loop(lambda: [token_text(i) for i in ids])
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        """vLLM's: token ids to text (special tokens included)."""
        adapter_of(named(body))
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is out of range; valid: 0..{engine.vocab_size - 1}", param="tokens")
        if len(body.tokens) > engine.max_model_len:
            raise APIError(400, f"tokens: {len(body.tokens)} ids; valid: at most {engine.max_model_len} "
                                "(max_model_len)", param="tokens")
        return {"prompt": await off_loop(lambda: tokenizer.decode(body.tokens))}

    def named(body) -> str:
        """The body's ``model``, the served base name when it is left out, null or empty (as vLLM
        reads it); set on the body, so that the reply names it."""
        if not body.model:
            body.model = served_model_name
        return body.model

    def adapter_of(model: str) -> str | None:
        if model == served_model_name:
            return None
        if model not in engine.registry.entries:
            served = [served_model_name] + engine.registry.names()
            listed = ", ".join(show(n, 60) for n in served[:20]) + (f" and {len(served) - 20} more"
                                                                     if len(served) > 20 else "")
            raise APIError(404, f"the model {show(model)} does not exist; served: {listed}", "not_found_error",
                           "model")
        return model

    def sampling(body, max_default: int) -> SamplingParams:
        bad = body.unsupported()
        if bad:
            raise APIError(400, bad[1], param=bad[0])
        if body.stream_options is not None and not body.stream:  # (OpenAI's and vLLM's 400 too)
            raise APIError(400, "stream_options: only read with stream: true; set stream, or leave stream_options "
                                "out", param="stream_options")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"stop: got {len(stop)} strings; valid: at most {limits.max_stop} "
                                "(--max-stop-strings)", param="stop")
        long = next((s for s in stop if len(s) > limits.max_stop_chars), None)
        if long is not None:
            raise APIError(400, f"stop: a string of {len(long)} characters; valid: at most {limits.max_stop_chars} "
                                "(--max-stop-chars)", param="stop")
        max_tokens = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        for name in body.ignored():
            name = name[:60]
            if name not in ignored_fields and len(ignored_fields) < MAX_IGNORED_LOGGED:  # once per name, as vLLM
                ignored_fields.add(name)
                LOG.warning("fastadapters serve: request field %r is not one this server knows; it was ignored%s",
                            name, "" if len(ignored_fields) < MAX_IGNORED_LOGGED else
                            f" (the last of {MAX_IGNORED_LOGGED} names logged; later ones are ignored silently)")
        try:
            params = SamplingParams(max_tokens=max_default if max_tokens is None else max_tokens,
                                    temperature=1.0 if body.temperature is None else body.temperature,
                                    top_p=1.0 if body.top_p is None else body.top_p,
                                    top_k=0 if body.top_k is None else body.top_k, seed=body.seed, stop=stop,
                                    ignore_eos=body.ignore_eos,
                                    min_p=0.0 if body.min_p is None else body.min_p,
                                    presence_penalty=body.presence_penalty or 0.0,
                                    frequency_penalty=body.frequency_penalty or 0.0,
                                    repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                                    logit_bias=body.token_bias(), min_tokens=body.min_tokens or 0,
                                    stop_token_ids=list(body.stop_token_ids or []), logprobs=body.logprobs_k(),
                                    allowed_token_ids=None if body.allowed_token_ids is None
                                    else list(body.allowed_token_ids),
                                    prompt_logprobs=prompt_k(body),
                                    prompt_ranks=body.prompt_logprobs_k() is not None,
                                    structured=structured_spec(body),
                                    include_stop_str_in_output=body.include_stop_str_in_output,
                                    skip_special_tokens=body.skip_special_tokens)
            params.validate(vocab_size=engine.vocab_size)
            keep_last(body)  # truncate_prompt_tokens checked before any tokenising
            words = body.bad_words or []
            if len(words) > MAX_BAD_WORDS or not all(0 < len(w) <= MAX_BAD_WORD_CHARS for w in words):
                raise ValueError(f"bad_words: valid: at most {MAX_BAD_WORDS} non-empty words of at most "
                                 f"{MAX_BAD_WORD_CHARS} characters")
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from None
        return params

    def prompt_k(body) -> int | None:
        """The engine's prompt log-probabilities k: for vLLM's ``prompt_logprobs`` and for completions'
        echo with ``logprobs`` (each answer takes its own top k of them); None when neither asks."""
        ks = [k for k in (body.prompt_logprobs_k(), body.logprobs_k() if getattr(body, "echo", None) else None)
              if k is not None]
        return max(ks) if ks else None

    def prompt_logprobs_body(entries: list | None, k: int) -> list | None:
        """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {token id: {"logprob",
        "rank", "decoded_token"}}, the prompt token first (its rank in the vocabulary) and the k most
        likely (ranks 1..k; a prompt token among them takes its place there, as vLLM's dict does)."""
        if entries is None:
            return None
        out = []
        for e in entries:
            if e is None:
                out.append(None)
                continue
            tok, lp, top, rank = e
            d = {str(tok): {"logprob": lp, "rank": rank, "decoded_token": token_text(tok)}}
            for r, (j, lq) in enumerate(top[:k], 1):
                d[str(j)] = {"logprob": lq, "rank": r, "decoded_token": token_text(j)}
            out.append(d)
        return out

    def structured_spec(body) -> StructuredSpec | None:
        got = body.structured()  # ValueError (a 400) names the field
        if got is None:
            return None
        return StructuredSpec(got.kind, got.value, got.choices, got.any_whitespace, source=got.source)

    def bad_word_ids(words: list[str]) -> list[list[int]]:
        """vLLM's tokenisation of bad_words: each word as written and with a leading space (how it
        reads mid-sentence), without special tokens; the same sequence once."""
        out: list[list[int]] = []
        for w in words:
            for text in (w.lstrip(), " " + w.lstrip()):
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []
                if ids and ids not in out:
                    out.append(ids)
        return out[:SamplingParams.MAX_BAD_WORDS]

    def keep_last(body) -> int | None:
        """How many of the prompt's last tokens ``truncate_prompt_tokens`` keeps (None: all)."""
        k = body.truncate_prompt_tokens
        if k is None:
            return None
        if k == -1:
            return engine.max_model_len
        if not 1 <= k <= engine.max_model_len:
            raise ValueError(f"truncate_prompt_tokens: got {k}; valid: null, -1 (the context, "
                             f"{engine.max_model_len}) or an integer in [1, {engine.max_model_len}] (max_model_len)")
        return k

    def check_chars(n: int, param: str) -> None:
        if n > max_prompt_chars:
            raise APIError(400, f"{param}: {n} characters cannot fit the context of {engine.max_model_len} tokens "
                                f"(max_model_len); shorten it", param=param)

    def prompts_of(body: CompletionRequest) -> list:
        """The request's prompts (a string or a list of token ids each): one, or a batch."""
        p = body.prompt
        batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(batch) * body.n > engine.scheduler.max_waiting and len(batch) > 1 \
                and body.n <= engine.scheduler.max_waiting:  # (an n too large alone is named by run)
            raise APIError(400, f"prompt: a batch of {len(batch)} prompts x n = {body.n} is {len(batch) * body.n} "
                                f"choices; this server queues at most {engine.scheduler.max_waiting} requests "
                                "(--max-waiting): send fewer at once", param="prompt")
        return batch

    def completion_ids(batch: list, keep: int | None = None) -> list[list[int]]:
        """Token ids of each prompt of ``prompts_of``'s batch (``keep``: only each one's last so many)."""
        out = []
        for p in batch:
            if isinstance(p, str):
                if keep and len(p) > max_prompt_chars:  # (truncate_prompt_tokens: what is kept fits)
                    ids = list(tokenizer(tail_text(p, keep), add_special_tokens=False)["input_ids"])
                else:
                    check_chars(len(p), "prompt")
                    ids = list(tokenizer(p)["input_ids"])
                out.append(ids[-keep:] if keep else ids)
                continue
            if keep:
                p = p[-keep:]
            if len(p) >= engine.max_model_len:
                raise APIError(400, f"prompt: {len(p)} tokens leave no room to generate in the context of "
                                    f"{engine.max_model_len} (max_model_len); shorten it", param="prompt")
            out.append(list(p))
        return out

    def chat_messages(body: ChatRequest, keep: int | None = None) -> list[dict]:
        messages, chars = [], 0
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: text only
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages: content part {show(part.get('type'), 40)} is not supported; "
                                            "valid: text parts", param="messages")
                    texts.append(part["text"])
                content = "".join(texts)
            chars += len(content or "")
            msg = {"role": m.role, "content": content or ""}
            for key in ("tool_calls", "tool_call_id", "name"):  # earlier turns' tool calls and results
                value = (m.model_extra or {}).get(key)
                if value is not None:
                    try:
                        _unicode(value)
                    except ValueError as e:
                        raise APIError(400, f"messages: {key}: {e}", param="messages") from None
                    msg[key] = _template_tool_calls(value) if key == "tool_calls" else value
                    chars += len(json.dumps(value))
            messages.append(msg)
        if keep is None:  # (with truncate_prompt_tokens only the rendered text's tail is tokenised)
            check_chars(chars, "messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        return messages

    def chat_ids(messages: list[dict], options: dict, keep: int | None = None) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        except Exception as e:
            raise APIError(400, f"messages: the chat template failed: {str(e)[:200]}", param="messages") from None
        if keep and len(text) > max_prompt_chars:
            text = tail_text(text, keep)
        try:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as e:
            raise APIError(400, f"messages: the rendered chat could not be tokenised: {str(e)[:200]}",
                           param="messages") from None
        return ids[-keep:] if keep else ids

    def tail_text(text: str, keep: int) -> str:
        """The end of ``text`` that holds its last ``keep`` tokens with room to spare: no token is longer
        than the longest in the vocabulary, and the first tokens of a cut text (which may split
        differently from the whole) are far from the ``keep`` kept."""
        return text[-(keep + 64) * longest_token:]

    async def off_loop(fn, *args):
        """Run tokenising work in the tokenizer thread (one at a time: fast tokenizers are not
        safe to call from several threads at once), never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    async def run(request: Request, body, prompts: list[list[int]], params: SamplingParams, chat: bool, adapter):
        """Serve one request: for each prompt (completions may send a batch) ``n`` choices, each an
        engine request (choice j's seed is ``seed + j`` when a seed is given), answered together or
        streamed as their tokens come; prompt i's choice j has index ``i * n + j`` (OpenAI's order)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        n = body.n
        count = len(prompts) * n
        subs = [rid] if count == 1 else [f"{rid}-{k}" for k in range(count)]
        info = request.scope.get(_LOG, {})
        info.update(id=rid, prompt_tokens=sum(map(len, prompts)))
        if n > engine.scheduler.max_waiting:
            raise APIError(400, f"n: got {n}; this server queues at most {engine.scheduler.max_waiting} requests "
                                "(--max-waiting), so at most that many choices", param="n")
        if getattr(body, "bad_words", None):  # tokenised off the event loop
            params = dataclasses.replace(params, bad_words_ids=await off_loop(bad_word_ids, body.bad_words))
            try:
                params.validate(vocab_size=engine.vocab_size)
            except ValueError as e:
                raise APIError(400, f"bad_words: {e}", param="bad_words") from None
        tool_call = body.tool_call() if chat else None  # (checked by sampling: no error here)
        if chat and body.echo and tool_call is not None:
            raise APIError(400, "echo: not with tool calls (tools with tool_choice 'auto', 'required' or a named "
                                "function): the reply is parsed into calls", param="echo")
        if tool_call is not None and tool_call[0] == "auto":  # the tools' names, for the parser
            tool_call = ("auto", frozenset(body._tool_params()))
            if special_tags and params.skip_special_tokens:  # else the tags would be left out of the text
                params = dataclasses.replace(params, skip_special_tokens=False)
        grammar = None
        if params.structured is not None:  # compiled off the event loop, and handed to submit
            try:  # a cached grammar at once: it never waits behind another spec's compile
                grammar = engine.cached_structured(params.structured)
                if grammar is None:
                    grammar = await asyncio.get_running_loop().run_in_executor(
                        grammar_pool, engine.compile_structured, params.structured)
            except ValueError as e:
                raise APIError(400, str(e), param=params.structured.source) from None
        echoes = [None] * len(prompts)
        if chat and body.echo:  # the last message's content, when the reply continues its role
            last = chat_messages(body, None)[-1]
            if not body.add_generation_prompt or last["role"] == "assistant":
                echoes[0] = last["content"]
        elif getattr(body, "echo", None):  # each prompt as sent (a string), else its tokens' decoding
            for i, (sent, ids) in enumerate(zip(prompts_of(body), prompts)):
                as_sent = isinstance(sent, str) and body.truncate_prompt_tokens is None  # (else what was kept)
                echoes[i] = sent if as_sent else await off_loop(tokenizer.decode, ids)
        submitted = []
        try:
            for k, sub in enumerate(subs):
                j = k % n
                p = params if j == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                engine.submit(prompts[k // n], p, adapter=adapter, request_id=sub, grammar=grammar,
                              on_output=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
                submitted.append(sub)
        except Exception as e:
            for sub in submitted:  # all choices or none
                engine.abort(sub)
            err = _api_error(e)
            if len(prompts) > 1:  # say which prompt of the batch
                err = APIError(err.status, f"prompt[{len(submitted) // n}]: {err.message}", err.type, err.param)
            raise err from None
        watch = request.scope.get(_WATCH)
        choices = Choices(subs, [prompts[k // n] for k in range(count)], chat, params.logprobs,
                          [echoes[k // n] for k in range(count)])

        def gone():  # the client went away: abort now (freed at the engine's next step), wake the waiter
            for sub in subs:
                engine.abort(sub)
            queue.put_nowait(_GONE)

        if watch is not None:
            watch.add(gone)
        if body.stream:
            return StreamingResponse(_stream(body, rid, queue, chat, watch, gone, info, choices, tool_call),
                                     media_type="text/event-stream")
        try:
            while not choices.done():
                out = await queue.get()
                if out is _GONE:
                    info["finish"] = "client_gone"
                    return Response(status_code=499)  # nobody reads it; the access log does
                choices.add(out)
                info["completion_tokens"] = choices.completion_tokens()
                if out.finished:
                    info["finish"] = out.finish_reason
                    if out.finish_reason == "error":
                        if (out.error or "").startswith(NO_TOKEN):  # what the request asked for excludes everything
                            raise APIError(400, f"generation failed: {out.error}")
                        raise APIError(500, f"generation failed: {out.error}", "server_error")
                    if out.finish_reason == "abort":
                        raise APIError(503, "the request was aborted (the server is shutting down)",
                                       "service_unavailable")
        finally:
            if watch is not None:
                watch.discard(gone)
            if not choices.done():
                for sub in subs:  # cancelled (client gone, server stopping) or failed: free the blocks
                    engine.abort(sub)
        now = int(time.time())
        out = []
        plp = body.prompt_logprobs_k()  # (vLLM's: each completions choice has its prompt's; chat one at the top)
        for i, c in enumerate(choices.list):
            logprobs = logprobs_body(c.pending, chat, c.offset) if choices.logprobs else None
            if chat:
                text = "".join(c.text)
                if tool_call is not None and tool_call[0] == "auto":  # text and calls
                    text, calls, reason = _auto_tool_calls(tool_call[1], text, c.reason, tool_call_parser)
                else:
                    calls, reason = _tool_calls(tool_call, text, c.reason, tool_call_parser)
                    text = None if calls else text
                message = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = calls
                out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
            else:
                out.append({"index": i, "text": "".join(c.text), "logprobs": logprobs, "finish_reason": c.reason})
                if plp is not None:
                    out[-1]["prompt_logprobs"] = prompt_logprobs_body(c.prompt_entries, plp)
        reply = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                 "model": body.model, "choices": out, "usage": choices.usage()}
        if chat and plp is not None:
            reply["prompt_logprobs"] = prompt_logprobs_body(choices.list[0].prompt_entries, plp)
        return reply

    async def _stream(body, rid: str, queue: asyncio.Queue, chat: bool, watch, gone, info, choices: "Choices",
                      tool_call=None):
        """Server-sent chunks. A named tool call streams its arguments as they come (the first chunk
        after the role names the function); a "required" one is sent whole when its choice finishes
        (its text is an array to parse), as the content if it did not parse; with "auto" each
        choice's text goes through the server's parser (``tool_parsers.stream``: content as it comes; a
        call's id and name when it opens, then its arguments as they come)."""
        now = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and body.stream_options.continuous_usage_stats  # (vLLM's)
        held: dict[int, list[str]] = {}  # "required": each choice's text until it finishes
        auto = tool_call is not None and tool_call[0] == "auto"
        parsers = [tool_stream(tool_call_parser, tool_call[1]) for _ in choices.list] if auto else []
        called = [0] * len(parsers)  # calls sent per choice (each call's index)
        cut = [False] * len(parsers)  # the choice ended inside a call's arguments

        def auto_chunks(i: int, text: str, reason: str | None) -> list[str]:
            """Choice i's chunks for its new text (``reason``: it finished): content, then calls."""
            events = parsers[i].feed(text) + (parsers[i].finish() if reason is not None else [])
            pieces = []  # (content, delta) per chunk
            for kind, value in events:
                if kind == "cut":  # the reply ended inside a call's arguments: not a finished call
                    cut[i] = True
                elif kind == "content":
                    pieces.append((value, None))
                elif kind == "call_args":  # the open call's arguments, as they come
                    pieces.append((None, {"tool_calls": [{"index": called[i] - 1, "function": {"arguments": value}}]}))
                else:  # a call opens (its name; arguments to come), or one read whole
                    fn = {"name": value, "arguments": ""} if kind == "call_open" else value
                    call = {"index": called[i], "id": call_id(tool_call_parser), "type": "function", "function": fn}
                    pieces.append((None, {"tool_calls": [call]}))
                    called[i] += 1
            if reason is not None:
                if reason == "stop" and called[i] and not cut[i]:
                    reason = "tool_calls"
                if not pieces:
                    pieces.append((None, {}))
            return [chunk(i, t, reason if k == len(pieces) - 1 else None, delta=d) for k, (t, d) in enumerate(pieces)]

        def tool_chunk(i: int, text: str, reason: str | None) -> str:
            if tool_call[0] == "named":
                return chunk(i, None, reason, delta={"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
                             if text else {})
            whole = "".join(held.pop(i, [])) + text
            calls, reason = _tool_calls(tool_call, whole, reason, tool_call_parser)
            if calls is None:
                return chunk(i, whole, reason)
            return chunk(i, None, reason, delta={"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})

        def chunk(i: int, text: str | None, reason: str | None, first: bool = False, delta: dict | None = None) -> str:
            logprobs = None
            c = choices.list[i]
            if choices.logprobs and not first:  # a chunk carries the tokens since the choice's last one
                logprobs = logprobs_body(c.pending, chat, c.offset)  # (text held back for a stop string
                c.pending.clear()  # goes out later)
            if chat:
                if delta is None:
                    role = {"role": "assistant", "content": None if tool_call is not None and not auto else ""}
                    delta = role if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            data = {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [choice]}
            if continuous:  # the choice's prompt and its tokens so far, as vLLM's chunks count them
                p, done = len(choices.prompts[i]), c.completion_tokens
                data["usage"] = {"prompt_tokens": p, "completion_tokens": done, "total_tokens": p + done}
            elif include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                for i in range(len(choices.list)):
                    yield chunk(i, None, None, first=True)
                    if tool_call is not None and tool_call[0] == "named":  # the call's id and name, then its arguments
                        call = {"index": 0, "id": call_id(tool_call_parser), "type": "function",
                                "function": {"name": tool_call[1], "arguments": ""}}
                        yield chunk(i, None, None, delta={"tool_calls": [call]})
            while True:
                out = await queue.get()
                if out is _GONE:
                    info["finish"] = "client_gone"
                    return
                i, text = choices.add(out, keep_text=False)
                info["completion_tokens"] = choices.completion_tokens()
                if out.finished:
                    info["finish"] = out.finish_reason
                    if out.finish_reason in ("error", "abort"):
                        err = error_body(f"generation failed: {out.error or out.finish_reason}", "server_error", 500) \
                            if not (out.error or "").startswith(NO_TOKEN) else \
                            error_body(f"generation failed: {out.error}", "invalid_request_error", 400)
                        yield f"data: {json.dumps(err)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if auto:
                        for piece in auto_chunks(i, text, out.finish_reason):
                            yield piece
                    else:
                        yield chunk(i, text, out.finish_reason) if tool_call is None else tool_chunk(i, text,
                                                                                                       out.finish_reason)
                    if choices.done():
                        if include_usage:
                            data = {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [],
                                    "usage": choices.usage()}
                            yield f"data: {json.dumps(data)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                elif text and tool_call is None:
                    yield chunk(i, text, None)
                elif text and auto:
                    for piece in auto_chunks(i, text, None):
                        yield piece
                elif text and tool_call[0] == "named":
                    yield tool_chunk(i, text, None)
                elif text:
                    held.setdefault(i, []).append(text)
        finally:
            if watch is not None:
                watch.discard(gone)
            if not choices.done():
                for sub in choices.subs:  # the client went away mid-stream, or a choice failed: free the blocks
                    engine.abort(sub)

    def log_model(request: Request, model: str, adapter) -> None:
        info = request.scope.get(_LOG, {})
        info.update(model=model, adapter=adapter)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        log_model(request, named(body), None)
        adapter = adapter_of(body.model)
        log_model(request, body.model, adapter)
        params = sampling(body, 16)
        batch = prompts_of(body)  # a batch too large answers before any tokenising
        prompts = await off_loop(completion_ids, batch, keep_last(body))
        return await run(request, body, prompts, params, chat=False, adapter=adapter)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        log_model(request, named(body), None)
        adapter = adapter_of(body.model)
        log_model(request, body.model, adapter)
        body._tool_parser = tool_call_parser  # (read by tool_call: "auto" needs one)
        sampling(body, engine.max_model_len)  # bad sampling fields answer before any tokenising
        try:
            options = body.template_options()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0]) from None
        keep = keep_last(body)
        ids = await off_loop(chat_ids, chat_messages(body, keep), options, keep)
        entry = engine.registry.entries.get(adapter) if adapter else None
        prefix = 0 if entry is None or entry.prefix_kv is None else int(entry.prefix_kv[0][0].shape[-2])
        room = engine.max_model_len - len(ids) - prefix  # the default max_tokens: what the context leaves
        return await run(request, body, [ids], sampling(body, max(1, room)), chat=True, adapter=adapter)

    def admin_allowed() -> None:
        if admin_needs_key and api_key is None:
            raise APIError(403, "loading and unloading adapters is off: the server listens on a non-loopback "
                                "address without --api-key; start it with --api-key (or "
                                "--allow-unauthenticated-admin)", "permission_error")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        admin_allowed()
        if len(body.lora_name) > 256 or not body.lora_name.strip():
            raise APIError(400, f"lora_name: got {show(body.lora_name)}; valid: a name of 1 to 256 characters",
                           param="lora_name")
        if body.lora_name == served_model_name:
            raise APIError(400, f"lora_name {show(body.lora_name)} is the base model's name", param="lora_name")
        try:
            await run_in_threadpool(lambda: engine.load_adapter(body.lora_name, body.lora_path,
                                                                max_bytes=max_adapter_bytes))
        except Exception as e:
            raise _api_error(e) from None
        return PlainTextResponse(f"Success: adapter {show(body.lora_name)} added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest):
        admin_allowed()
        if body.lora_name not in engine.registry.entries:
            raise APIError(404, f"no adapter named {show(body.lora_name)} is loaded", "not_found_error", "lora_name")
        try:
            await run_in_threadpool(engine.unload_adapter, body.lora_name)
        except Exception as e:
            raise _api_error(e) from None
        return PlainTextResponse(f"Success: adapter {show(body.lora_name)} removed successfully.")

    return app


def _template_tool_calls(calls):
    """An assistant message's tool calls for the chat template: each call's JSON ``arguments`` string
    parsed into an object (what chat templates index into, as vLLM does); anything else unchanged."""
    if not isinstance(calls, list):
        return calls
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                call = {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
            except ValueError:
                pass
        out.append(call)
    return out


def _tool_calls(call: tuple[str, str | None] | None, text: str, reason: str | None,
                parser: str | None = None) -> tuple[list | None, str | None]:
    """A finished choice's tool calls from its text (``call``: ``ChatRequest.tool_call()``), and its
    finish reason: a named function's arguments are the text ("stop" as OpenAI); "required" parses the
    text's array of {"name", "parameters"} ("tool_calls"). None when the text is not a whole call (cut by
    max_tokens or a stop string): then the text stays the content. Ids: ``tool_parsers.call_id`` of the
    server's ``parser`` (a Mistral model's template takes only its own ids back)."""
    if call is None:
        return None, reason
    if call[0] == "named":
        return [{"id": call_id(parser), "type": "function", "function": {"name": call[1], "arguments": text}}], reason
    try:
        items = json.loads(text)
    except ValueError:
        return None, reason
    if reason != "stop" or not isinstance(items, list):
        return None, reason
    return [{"id": call_id(parser), "type": "function",
             "function": {"name": it["name"], "arguments": json.dumps(it["parameters"])}} for it in items], "tool_calls"


def _auto_tool_calls(names, text: str, reason: str | None,
                     parser: str) -> tuple[str | None, list | None, str | None]:
    """A finished "auto" choice's (content, tool calls or None, finish reason): ``tool_parsers.parse``
    with the server's ``parser``; "tool_calls" when it made calls and ended by itself, not inside one
    (a stop string that cut a call's arguments leaves "stop")."""
    content, calls, cut = split_tools(text, names, parser)
    calls = [{"id": call_id(parser), "type": "function", "function": c} for c in calls]
    return content, calls or None, "tool_calls" if calls and reason == "stop" and not cut else reason


def _byte_level_chars(tokenizer) -> dict[str, int] | None:
    """Character -> the byte it stands for, where ``tokenizer`` is byte-level BPE (its decoder is
    ``tokenizers``' ByteLevel, alone or inside a Sequence -- transformers 5.17's GGUF conversion
    writes SmolLM2's as ByteFallback, Fuse, Replace, ByteLevel --: GPT-2's map of the 256 bytes to
    printable characters); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    except (AttributeError, TypeError, ValueError):  # not a tokenizers backend we can read
        return None

    def byte_level(d) -> bool:
        return isinstance(d, dict) and (d.get("type") == "ByteLevel" or (
            d.get("type") == "Sequence" and any(byte_level(x) for x in d.get("decoders") or ())))

    if not byte_level(decoder):
        return None
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _stripped_space_marker(tokenizer, vocab: dict) -> str | None:
    """The marker "▁" where ``tokenizer`` is SentencePiece-style and its ``decode`` of a lone token
    drops the space that a piece's leading "▁" stands for (Llama-2, Mistral, Gemma); else None.
    Found by trying it: a vocabulary piece "▁" + a letter, decoded alone."""
    marker = "\u2581"
    for piece, i in vocab.items():
        if len(piece) > 1 and piece[0] == marker and piece[1].isalpha():
            try:
                text = tokenizer.decode([i], skip_special_tokens=False)
            except Exception:
                return None
            return marker if not text.startswith(" ") else None
    return None


class _Choice:
    def __init__(self):
        self.text, self.pending, self.offset = [], [], [0]  # pending: log-prob entries not yet sent
        self.reason, self.completion_tokens, self.echoed = None, 0, False
        self.prompt_entries = None  # the engine's prompt log-probability entries (with prompt log-probabilities)


class Choices:
    """The choices of one HTTP request (n per prompt): each engine request's text, log-probabilities,
    finish reason and token count, gathered from its outputs. ``echoes[i]``: choice i's prompt text
    (or None), put before its first text (with the prompt's log-probabilities before its tokens')."""

    def __init__(self, subs: list[str], prompts: list[list[int]], chat: bool, logprobs_k: int | None,
                 echoes: list[str | None]):
        self.subs, self.chat, self.logprobs_k = subs, chat, logprobs_k
        self.prompts, self.echoes = prompts, echoes  # per choice
        # each distinct prompt counted once (a choice's prompt object is its prompt's, shared by its n)
        self.prompt_tokens = sum(len(p) for p in {id(p): p for p in prompts}.values())
        self.index = {s: i for i, s in enumerate(subs)}
        self.list = [_Choice() for _ in subs]
        self.finished = 0

    def add(self, out, keep_text: bool = True) -> tuple[int, str]:
        """Take one engine output; returns its choice's index and the text it adds."""
        i = self.index[out.request_id]
        c = self.list[i]
        text = out.text
        if out.prompt_logprobs is not None and c.prompt_entries is None:
            c.prompt_entries = out.prompt_logprobs
        if self.echoes[i] is not None and not c.echoed:
            c.echoed = True
            text = self.echoes[i] + text
            if self.logprobs and not self.chat:  # the first prompt token has no log-probability; each its top k
                ids, k = self.prompts[i], self.logprobs_k
                entries = out.prompt_logprobs or [None] * len(ids)
                c.pending.extend((e[0], e[1], e[2][:k]) if e is not None else (ids[j], None, None)
                                 for j, e in enumerate(entries))
        if keep_text:
            c.text.append(text)
        c.pending.extend(out.logprobs or ())
        c.completion_tokens = out.completion_tokens
        if out.finished and c.reason is None:
            c.reason = out.finish_reason
            self.finished += 1
        return i, text

    @property
    def logprobs(self) -> bool:
        """Did the request ask for its output tokens' log-probabilities?"""
        return self.logprobs_k is not None

    def done(self) -> bool:
        return self.finished == len(self.list)

    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.list)

    def usage(self) -> dict:  # the prompt counted once, as OpenAI does for n > 1
        done = self.completion_tokens()
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}
