"""`fastadapters serve` under faults and hostile input (issue 17): nothing a client sends or abandons
may hang, poison or slow the others, and every refusal is an OpenAI-shaped 4xx.

Tiny llama + character tokenizer; in-process (starlette's TestClient) where no socket is needed,
a live uvicorn on 127.0.0.1 (``live_server``) for disconnects and slow bodies; ``serve.main`` with
uvicorn stubbed for the command line (a real process is test_serve_cli's). Each test names the
behaviour it checks.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from starlette.testclient import TestClient

from fastadapters.serving import serve
from fastadapters.serving.api import Limits, create_app
from .char_tokenizer import char_tokenizer
from .helpers import add_zoo, tiny_llama
from .live_server import live_server
from .serve_helpers import assert_no_leaks, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)

BASE = "tiny"
WEIGHTS = "adapter_model.safetensors"


def make_engine(paths=None, root=None, **kw):
    kw.setdefault("max_num_seqs", 4)
    return tiny_engine(paths, tokenizer=char_tokenizer(), adapter_roots=[str(root)] if root else None, **kw)


def error_of(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


@pytest.fixture(scope="module")
def client(zoo, tmp_path_factory):
    """One in-process app over the zoo (lora_r4 loaded) with an adapter root; limits small enough to test."""
    root = tmp_path_factory.mktemp("faults-root")
    engine = make_engine({"lora_r4": zoo["lora_r4"]}, root)
    app = create_app(engine, BASE, limits=Limits(max_request_bytes=64 << 10, max_stop=4, max_stop_chars=20))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield engine, c, root


def _wait(cond, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the watchdog ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_when_the_engine_stalls_or_dies(zoo):
    engine = make_engine()
    gate = threading.Event()
    forward = engine._forward

    def stuck(batch):  # a step that never completes until released
        gate.wait(30)
        return forward(batch)

    engine._forward = stuck
    app = create_app(engine, BASE, limits=Limits(stall_seconds=0.3))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200
        req = engine.submit([3, 4, 5], engine_params(max_tokens=2))
        time.sleep(0.6)
        err = error_of(c.get("/health"), 503)
        assert "no step" in err["message"]
        gate.set()
        _wait(lambda: req.finish_reason is not None, what="the released request")
        assert c.get("/health").status_code == 200
        step = engine.step
        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("every step fails"))  # the loop spins
        with pytest.warns(RuntimeWarning):
            stuck_req = engine.submit([3, 4], engine_params(max_tokens=1))
            time.sleep(0.6)
            err = error_of(c.get("/health"), 503)
        assert "no step" in err["message"] and "every step fails" in err["message"]
        engine.step = step
        _wait(lambda: stuck_req.finish_reason is not None, what="the request after the failures")
        assert c.get("/health").status_code == 200
        engine.step = lambda: (_ for _ in ()).throw(SystemExit("boom"))  # kills the thread: not an Exception
        engine.submit([3, 4], engine_params(max_tokens=1))
        _wait(lambda: not engine._thread.is_alive(), what="the engine thread to die")
        assert "stopped" in error_of(c.get("/health"), 503)["message"]


def engine_params(**kw):
    from fastadapters.serving.sampling import SamplingParams

    return SamplingParams(temperature=0, **kw)


# -- adapters --------------------------------------------------------------------------------------

def _nan_copy(src: str, dst) -> str:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, WEIGHTS))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, os.path.join(dst, WEIGHTS))
    return str(dst)


def test_nonfinite_adapter_refused_at_runtime(client, zoo):
    engine, c, root = client
    _nan_copy(zoo["houlsby"], root / "nan_h")
    before = c.get("/v1/models").json()["data"]
    names = set(__import__("fastadapters").adapter_names(engine.model))
    err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(root / "nan_h")}), 400)
    assert "non-finite" in err["message"]
    assert c.get("/v1/models").json()["data"] == before
    assert set(__import__("fastadapters").adapter_names(engine.model)) == names  # nothing left on the model


def test_file_symlink_out_of_the_root_is_refused_without_echo(client, zoo, tmp_path):
    engine, c, root = client
    import shutil

    outside = tmp_path / "outside"
    shutil.copytree(zoo["lora_r64"], outside)
    evil = root / "evil"
    evil.mkdir()
    shutil.copy(os.path.join(zoo["lora_r64"], "adapter_config.json"), evil / "adapter_config.json")
    (evil / WEIGHTS).symlink_to(outside / WEIGHTS)  # a real folder inside the root, its weights outside
    err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(evil)}), 403)
    tensor_names = load_file(str(outside / WEIGHTS)).keys()
    assert str(outside) not in err["message"] and not any(k in err["message"] for k in tensor_names)
    assert "evil" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    # a relative path is taken under the root, never the server's working directory, which is never echoed
    for rel in ("../../../etc", "nope/../../x"):
        err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": rel}), 403)
        assert os.getcwd() not in err["message"] and str(root) not in err["message"]
    shutil.copytree(zoo["pfeiffer"], root / "pf")
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "pf_rel", "lora_path": "pf"})
    assert r.status_code == 200, r.text
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "pf_rel"}).status_code == 200
    # not a regular file: refused before any read (a FIFO would block the reader forever)
    fifo = root / "fifo"
    fifo.mkdir()
    shutil.copy(os.path.join(zoo["lora_r64"], "adapter_config.json"), fifo / "adapter_config.json")
    os.mkfifo(fifo / WEIGHTS)
    assert "regular file" in error_of(c.post("/v1/load_lora_adapter",
                                             json={"lora_name": "f", "lora_path": str(fifo)}), 400)["message"]


def test_a_bad_adapter_inside_the_root_quotes_only_the_given_path(client, zoo):
    engine, c, root = client
    import shutil

    bad = root / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{ not json")
    shutil.copy(os.path.join(zoo["lora_r64"], WEIGHTS), bad / WEIGHTS)
    for given in ("bad", str(bad)):
        msg = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": given}), 400)["message"]
        assert "fastadapters-adapter-" not in msg and os.getcwd() not in msg
        if given == "bad":  # a relative path: the root's location is never revealed
            assert str(root) not in msg and os.path.realpath(root) not in msg
    shutil.copytree(zoo["pfeiffer"], root / "pf_given")
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "pf_given", "lora_path": "pf_given"}).status_code == 200
    shown = {m["id"]: m["root"] for m in c.get("/v1/models").json()["data"]}
    assert shown["pf_given"] == "pf_given"  # the path as given, not resolved
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "pf_given"}).status_code == 200


def test_a_file_swapped_after_the_check_is_never_read(zoo, tmp_path):
    """confine checks, then the copy opens each file once on a checked descriptor: a weights file
    replaced by a link to an outside file, or grown past the limit, between the two is refused."""
    import shutil

    import pytest

    from fastadapters.serving.adapters import AdapterError, PathNotAllowed, confine, private_copy

    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(zoo["lora_r64"], root / "a")
    shutil.copytree(zoo["lora_r64"], outside)
    size = sum(os.path.getsize(root / "a" / f) for f in os.listdir(root / "a"))
    folder = confine("a", [str(root)], size)
    copy = private_copy(folder, [str(root)], size, "a")
    assert sorted(os.listdir(copy)) == sorted(os.listdir(folder))
    shutil.rmtree(copy)
    os.remove(root / "a" / WEIGHTS)
    (root / "a" / WEIGHTS).symlink_to(outside / WEIGHTS)  # the swap
    with pytest.raises(PathNotAllowed):
        private_copy(folder, [str(root)], size, "a")
    os.remove(root / "a" / WEIGHTS)
    shutil.copy(outside / WEIGHTS, root / "a" / WEIGHTS)
    with open(root / "a" / WEIGHTS, "ab") as f:  # grown past the limit after the check
        f.write(b"\0" * 1024)
    with pytest.raises(AdapterError, match="--max-adapter-bytes"):
        private_copy(folder, [str(root)], size, "a")
    left = [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("fastadapters-adapter-")]
    assert not any(os.path.getmtime(os.path.join(tempfile.gettempdir(), d)) > time.time() - 5 for d in left)


def test_adapter_size_limit_is_checked_before_reading(zoo, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(zoo["lora_r64"], root / "big")
    engine = make_engine(root=root)
    size = sum(os.path.getsize(root / "big" / f) for f in os.listdir(root / "big"))
    app = create_app(engine, BASE, max_adapter_bytes=size - 1)
    with TestClient(app, raise_server_exceptions=False) as c:
        err = error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "big"}), 400)
        assert "--max-adapter-bytes" in err["message"]
        sparse = root / "sparse"  # 64 GiB on paper, nothing on disk: refused from its size alone
        sparse.mkdir()
        shutil.copy(root / "big" / "adapter_config.json", sparse / "adapter_config.json")
        with open(sparse / WEIGHTS, "wb") as f:
            f.truncate(64 << 30)
        t = time.monotonic()
        error_of(c.post("/v1/load_lora_adapter", json={"lora_name": "s", "lora_path": "sparse"}), 400)
        assert time.monotonic() - t < 5
    from fastadapters.serving.adapters import default_max_adapter_bytes

    model = tiny_llama()  # the default: from the model's shapes, a floor for tiny models
    assert default_max_adapter_bytes(model) == 16 << 20
    assert default_max_adapter_bytes(model, rank=128, floor=0) == 4 * 128 * sum(
        m.in_features + m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)) + (1 << 20)


# -- request limits and hostile input ----------------------------------------------------------------

def test_body_size_limit_is_413(client):
    engine, c, _ = client
    body = json.dumps({"model": BASE, "prompt": "a" * (70 << 10), "max_tokens": 1}).encode()
    err = error_of(c.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 413)
    assert "--max-request-bytes" in err["message"]

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(10):
            yield b"x" * (10 << 10)

    error_of(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_tokenising_is_off_the_event_loop_and_long_prompts_are_refused_untokenised(zoo):
    engine = make_engine()
    tok = engine.tokenizer
    calls = []

    class Slow(type(tok)):
        def __call__(self, text, *a, **kw):
            calls.append(len(text))
            if text.startswith("slow"):
                time.sleep(3)
            return super().__call__(text, *a, **kw)

    tok.__class__ = Slow
    with live_server(create_app(engine, BASE)) as url:
        done = []
        t = threading.Thread(target=lambda: done.append(httpx.post(
            f"{url}/v1/completions", json={"model": BASE, "prompt": "slow one", "max_tokens": 2}, timeout=30)))
        t.start()
        _wait(lambda: calls, what="the slow tokenisation to start")
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.5  # answered while the tokenizer thread sleeps (3 s)
        t.join(30)
        assert done[0].status_code == 200
        calls.clear()
        limit = engine.max_model_len * max(len(k) for k in tok.get_vocab())
        r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "a" * (limit + 1)}, timeout=30)
        assert "max_model_len" in error_of(r, 400)["message"] and calls == []  # refused before tokenising


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "prompt": "ab\\ud800cd", "max_tokens": 1}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x\\udfff"}], "max_tokens": 1}',
    b'{"model": "tiny", "messages": [{"role": "\\ud83d", "content": "x"}], "max_tokens": 1}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
    b'{"model": "ti\\ud800ny", "prompt": "a"}',
    b'{"model": "tiny", "prompt": "\xff\xfe bad utf-8", "max_tokens": 1}',
], ids=["prompt", "content", "role", "content-part", "model", "bytes"])
def test_invalid_unicode_is_a_400(client, body):
    engine, c, _ = client
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    error_of(c.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert c.post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 1}).status_code == 200


def test_stop_strings_are_limited(client):
    engine, c, _ = client
    post = lambda stop: c.post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 2,  # noqa: E731
                                                       "stop": stop})
    err = error_of(post(["x"] * 5000), 400)  # under the body limit
    assert err["param"] == "stop" and "--max-stop-strings" in err["message"]
    assert "--max-stop-chars" in error_of(post(["y" * 21]), 400)["message"]
    assert post(["q", "r", "s", "y" * 20]).status_code == 200


def test_logprobs_out_of_range_and_unsupported_forms_are_refused_not_ignored(client):
    engine, c, _ = client
    chat = {"messages": [{"role": "user", "content": "a"}]}
    for path, extra, param in (("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
                               ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
                               ("/v1/completions", {"prompt": "a", "prompt_logprobs": -1}, "prompt_logprobs"),
                               ("/v1/completions", {"prompt": "a", "prompt_logprobs": 1, "stream": True},
                                "prompt_logprobs"),
                               ("/v1/chat/completions", dict(chat, top_logprobs=2), "top_logprobs"),
                               ("/v1/chat/completions", dict(chat, logprobs=True, top_logprobs=21), "top_logprobs")):
        err = error_of(c.post(path, json={"model": BASE, "max_tokens": 1, **extra}), 400)
        assert err["param"] == param, (extra, err)
    for path, extra in (("/v1/chat/completions", dict(chat, logprobs=False)),
                        ("/v1/completions", {"prompt": "a", "logprobs": None})):
        r = c.post(path, json={"model": BASE, "max_tokens": 1, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400(client):
    engine, c, _ = client
    n = engine.max_model_len
    err = error_of(c.post("/v1/completions", json={"model": BASE, "prompt": [5] * 100, "max_tokens": n - 99}), 400)
    assert err["param"] == "max_tokens" and str(n - 100) in err["message"]
    ok = c.post("/v1/completions", json={"model": BASE, "prompt": [5] * 100, "max_tokens": n - 100,
                                         "temperature": 0, "ignore_eos": True}).json()
    assert ok["usage"]["completion_tokens"] == n - 100 and ok["choices"][0]["finish_reason"] == "length"
    assert_no_leaks(engine)


def test_echoed_names_are_truncated(client):
    engine, c, _ = client
    for path, body in (("/v1/completions", {"model": "m" * 50_000, "prompt": "a"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "n" * 50_000})):
        r = c.post(path, json=body)
        error_of(r, 404)
        assert len(r.content) < 1000


def test_header_size_limit_is_431(client):
    engine, c, _ = client
    err = error_of(c.get("/v1/models", headers={"x-big": "a" * 100_000}), 431)
    assert "--max-header-bytes" in err["message"]


def test_slow_body_times_out_with_408(zoo):
    engine = make_engine()
    with live_server(create_app(engine, BASE, limits=Limits(body_timeout=0.5))) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{\"model\":")
            t, reply = time.monotonic(), b""
            while b"}}" not in reply and time.monotonic() - t < 5:  # headers and body may come apart
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            assert time.monotonic() - t < 5
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"code":408' in reply.replace(b" ", b"")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a trickle: the deadline is whole-body
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n")
            t, reply = time.monotonic(), b""
            s.settimeout(0.1)
            while b"}}" not in reply and time.monotonic() - t < 5:
                try:
                    s.sendall(b" ")
                    reply += s.recv(65536)
                except (socket.timeout, BrokenPipeError, ConnectionResetError):
                    pass
            assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 3, reply[:200]


def test_slow_headers_are_cut_off_and_a_kept_alive_connection_gets_the_same_deadline(zoo):
    """--header-timeout: a client trickling its request headers is disconnected at the deadline
    (uvicorn alone keeps it forever: its keep-alive timer stops at the first byte); a normal request
    on the same server is answered, and after its response the kept-alive connection's next headers
    have the same deadline."""
    engine = make_engine()
    with live_server(create_app(engine, BASE), http=serve.header_deadline_protocol(0.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(0.1)
            t, closed = time.monotonic(), False
            s.sendall(b"GET /v1/models HTTP/1.1\r\n")
            while time.monotonic() - t < 5:  # one header byte every 0.1 s, never finishing
                try:
                    s.sendall(b"x")
                    if s.recv(65536) == b"":
                        closed = True
                        break
                except socket.timeout:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            assert closed and 0.4 < time.monotonic() - t < 3
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
            s.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's headers, never finished
            s.settimeout(5)
            t = time.monotonic()
            try:
                rest = s.recv(65536)
            except ConnectionResetError:
                rest = b""
            assert rest == b"" and time.monotonic() - t < 3  # closed at its own deadline


def test_unhandled_errors_are_openai_shaped(zoo):
    engine = make_engine()
    app = create_app(engine, BASE)
    with TestClient(app, raise_server_exceptions=False) as c:
        engine.adapters = lambda: 1 / 0
        err = error_of(c.get("/v1/models"), 500)
        assert err["type"] == "server_error"
        assert c.get("/health").status_code == 200


def test_openapi_documents_400_not_422(client):
    engine, c, _ = client
    spec = c.get("/openapi.json").json()
    text = json.dumps(spec)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"):
        assert {"400", "413", "500"} <= set(spec["paths"][path]["post"]["responses"]), path
    assert "503" in spec["paths"]["/health"]["get"]["responses"]


# -- disconnects -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_leaves_a_non_streaming_request_aborts_it(zoo, path):
    engine = make_engine(max_model_len=4096)
    with live_server(create_app(engine, BASE)) as url:
        port = int(url.rsplit(":", 1)[1])
        body = {"model": BASE, "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
        body.update({"prompt": "abc"} if "chat" not in path else {"messages": [{"role": "user", "content": "abc"}]})
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(data)}\r\n\r\n".encode() + data)
        _wait(lambda: engine.stats["generation_tokens"] >= 3, what="generation to start")
        s.close()
        t = time.monotonic()
        _wait(lambda: engine.snapshot()["live_requests"] == 0, timeout=10, what="the abort")
        assert time.monotonic() - t < 2
        assert engine.stats["finished_abort"] == 1 and engine.stats["generation_tokens"] < 4000
        assert_no_leaks(engine)


# -- auth ------------------------------------------------------------------------------------------

def test_api_key_is_required_on_v1_and_admin_needs_a_key_when_open(zoo, tmp_path):
    engine = make_engine(root=tmp_path)
    with TestClient(create_app(engine, BASE, api_key="s3cret"), raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200
        assert error_of(c.get("/v1/models"), 401)["type"] == "authentication_error"
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(c.post("/v1/completions", json={"model": BASE, "prompt": "a"}), 401)
        error_of(c.post("/tokenize", json={"model": BASE, "prompt": "a"}), 401)  # vLLM's routes: keyed too
        error_of(c.post("/detokenize", json={"model": BASE, "tokens": [5]}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert "401" in c.get("/openapi.json").json()["paths"]["/v1/models"]["get"]["responses"]
    engine = make_engine(root=tmp_path)
    # a key beyond Latin-1 (only create_app can be given one; serve refuses it) is never matched by '?'s
    with TestClient(create_app(engine, BASE, api_key="\u5bc6\u7801\u5bc6\u7801"), raise_server_exceptions=False) as c:
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer ????"}), 401)
        ok = c.get("/v1/models", headers=[(b"authorization", "Bearer \u5bc6\u7801\u5bc6\u7801".encode())])
        assert ok.status_code == 200, ok.text
    engine = make_engine(root=tmp_path)
    with TestClient(create_app(engine, BASE, admin_needs_key=True), raise_server_exceptions=False) as c:
        for route, body in (("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "x"}),
                            ("/v1/unload_lora_adapter", {"lora_name": "a"})):
            assert "--api-key" in error_of(c.post(route, json=body), 403)["message"]
        assert c.post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 1}).status_code == 200


# -- the access log ----------------------------------------------------------------------------------

class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_one_access_log_line_per_request_and_a_shutdown_line(zoo):
    engine = make_engine({"lora_r4": zoo["lora_r4"]})
    log, seen = logging.getLogger("fastadapters.serve.access"), _Lines()
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(seen)
    try:
        _access_log_requests(engine)
    finally:
        log.removeHandler(seen)
        log.setLevel(level)
    lines = seen.lines
    _check_access_lines(lines)


def _access_log_requests(engine):
    with TestClient(create_app(engine, BASE), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": "lora_r4", "prompt": "abc", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        c.post("/v1/completions", json={"model": "nope", "prompt": "a"})


def _check_access_lines(lines):
    rid = [m.split()[0] for m in lines if m.startswith("cmpl-")][0]
    mine = [m for m in lines if rid in m]
    assert len(mine) == 1, lines
    line = mine[0]
    for part in ("status=200", "model='lora_r4'", "adapter='lora_r4'", "prompt_tokens=3", "completion_tokens=3",
                 "finish=length", "latency_ms="):
        assert part in line, line
    assert any("status=404" in m and "POST /v1/completions" in m and "model='nope'" in m for m in lines)
    assert "shut down" in lines[-1] and "finished" in lines[-1]


# -- the command line: start-up refusals, flags, GGUF, SIGTERM ---------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    model = tiny_llama()
    model.save_pretrained(d / "base")
    char_tokenizer().save_pretrained(d / "base")
    add_zoo(model, ["houlsby"])
    import fastadapters as fa

    fa.save_adapter(model, d / "h", name="houlsby")
    return d


class _Started(Exception):
    pass


@pytest.fixture
def no_uvicorn(monkeypatch):
    """uvicorn never runs: reaching it raises _Started with the app (a refusal must come before)."""
    import uvicorn

    def run(self, *a, **kw):
        raise _Started(self.config.app, self.config)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(serve, "_access_log", lambda enabled: None)  # no stderr handler left behind
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: (_ for _ in ()).throw(_Started(app)))


def _one_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for p in parts:
        assert p in err, err


def test_startup_refusals_exit_2_with_one_line(base_dir, tmp_path, capsys, no_uvicorn, monkeypatch):
    base = str(base_dir / "base")
    monkeypatch.setattr(serve, "build_app", lambda args: (_ for _ in ()).throw(AssertionError("loaded the model")))
    assert serve.main(["--base-model", base, "--served-model-name", "tiny", "--adapter",
                       f"tiny={base_dir / 'h'}"]) == 2
    _one_line(capsys, "--adapter tiny", "served base model")
    assert serve.main(["--base-model", base, "--api-key", "caf\u00e9-key"]) == 2
    _one_line(capsys, "--api-key", "ASCII")
    monkeypatch.undo()
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **kw: (_ for _ in ()).throw(_Started(self.config.app)))
    assert serve.main(["--base-model", base, "--max-model-len", "100000"]) == 2
    _one_line(capsys, "--max-model-len 100000", "128 positions", "--allow-long-max-model-len")
    with pytest.raises(_Started):
        serve.main(["--base-model", base, "--max-model-len", "256", "--allow-long-max-model-len"])
    capsys.readouterr()
    bad = _nan_copy(str(base_dir / "h"), tmp_path / "nan")
    assert serve.main(["--base-model", base, "--adapter", f"n={bad}"]) == 2
    _one_line(capsys, "non-finite")


def test_open_host_refuses_admin_routes_without_a_key(base_dir, no_uvicorn, monkeypatch, capsys):
    base = str(base_dir / "base")
    for extra, key, status in (([], None, 403), (["--allow-unauthenticated-admin"], None, 404),
                               (["--api-key", "k"], "k", 404), ([], "env-key", 404)):
        monkeypatch.delenv("FASTADAPTERS_API_KEY", raising=False)
        if key == "env-key":
            monkeypatch.setenv("FASTADAPTERS_API_KEY", key)
        with pytest.raises(_Started) as started:
            serve.main(["--base-model", base, "--host", "0.0.0.0", "--adapter-root", str(base_dir), *extra])
        config = started.value.args[1]
        assert config.h11_max_incomplete_event_size is not None and config.timeout_keep_alive == 5
        assert config.timeout_graceful_shutdown == 5 and config.host == "0.0.0.0"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with TestClient(started.value.args[0], raise_server_exceptions=False) as c:
            r = c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=headers)
            assert r.status_code == status, (extra, key, r.text)
            if key:
                assert c.get("/v1/models").status_code == 401


def test_serve_help_shows_defaults_gguf_and_every_limit(capsys):
    assert serve.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--gguf-file", "GGUF", "--api-key", "--allow-unauthenticated-admin", "--max-adapter-bytes",
                 "--max-request-bytes", "--max-header-bytes", "--body-timeout", "--timeout-keep-alive",
                 "--max-stop-strings", "--max-stop-chars", "--health-stall-seconds", "--shutdown-timeout",
                 "--allow-long-max-model-len", "(default: 16)", "(default: 127.0.0.1)", "(default: 5.0)"):
        assert flag in out, flag


def test_serve_takes_the_gguf_flags_of_train_and_eval(tmp_path, capsys, monkeypatch, no_uvicorn):
    d = tmp_path / "g"
    d.mkdir()
    (d / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert serve.main(["--base-model", str(d)]) == 2
    _one_line(capsys, "pass --gguf-file m.Q4_1.gguf")
    assert serve.main(["--base-model", str(d), "--gguf-file", "other.gguf"]) == 2
    _one_line(capsys, "--gguf-file other.gguf: not in")
    seen = []
    monkeypatch.setattr(serve, "load_base", lambda path, dtype, gguf_file=None: (seen.append(
        serve._split_gguf(path, gguf_file)), (_ for _ in ()).throw(ValueError("stop here")))[1])
    assert serve.main(["--base-model", str(d), "--gguf-file", "m.Q4_1.gguf"]) == 2
    assert serve.main(["--base-model", str(d / "m.Q4_1.gguf")]) == 2  # today's .gguf path form still works
    assert seen == [(str(d), "m.Q4_1.gguf")] * 2


class _Exited(Exception):
    pass


def test_a_second_sigterm_exits_at_once(monkeypatch, capfd):
    """The server's signal handler: the first SIGTERM starts the drain (uvicorn's should_exit), the
    second exits the process at once. (The drain-then-abort of a real process is checked in
    test_serve_cli's process test.)"""
    import uvicorn

    server = serve._Server(uvicorn.Config(lambda scope, receive, send: None), shutdown_timeout=300)
    monkeypatch.setattr(serve.os, "_exit", lambda code: (_ for _ in ()).throw(_Exited(code)))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and not server.force_exit
    assert "up to 300 s (SIGTERM again to exit now)" in capfd.readouterr().err
    with pytest.raises(_Exited) as exited:
        server.handle_exit(signal.SIGTERM, None)
    assert exited.value.args[0] == 128 + signal.SIGTERM
    assert "second SIGTERM: exiting now" in capfd.readouterr().err


def test_serve_flags_reach_the_engine_residency_and_prefix_cache(base_dir, no_uvicorn):
    base = str(base_dir / "base")
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base])
    engine = started.value.args[0].state.engine
    assert engine.max_loras is None and engine.scheduler.prefix_caching is True
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base, "--max-loras", "2", "--no-prefix-caching"])
    engine = started.value.args[0].state.engine
    assert engine.max_loras == 2 and engine.scheduler.prefix_caching is False
    assert engine.pack_weights is True  # (auto: the tiny base's copies are far below half the memory)
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base, "--weight-packing", "off"])
    engine = started.value.args[0].state.engine
    assert engine.pack_weights is False and engine.onednn_linears.packed == 0


def test_serve_attention_backend_reaches_the_engine(base_dir, no_uvicorn, capsys):
    base = str(base_dir / "base")
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base, "--attention-backend", "sdpa"])
    assert started.value.args[0].state.engine.attention_backend == "sdpa"
    # FlashInfer needs CUDA: on the CPU asking for it is a start-up refusal naming what is valid
    assert serve.main(["--base-model", base, "--attention-backend", "flashinfer"]) == 2
    err = capsys.readouterr().err
    assert "attention_backend='flashinfer' needs the model on CUDA" in err and "'sdpa'" in err


def test_serve_cuda_graph_flags_reach_the_engine(base_dir, no_uvicorn, capsys):
    base = str(base_dir / "base")
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base, "--max-num-seqs", "8", "--cuda-graph-sizes", "4", "2", "--enforce-eager"])
    engine = started.value.args[0].state.engine
    assert engine.cuda_graph_sizes == (2, 4) and engine._graphs is None
    assert serve.main(["--base-model", base, "--max-num-seqs", "8", "--cuda-graph-sizes", "9"]) == 2
    err = capsys.readouterr().err
    assert "cuda_graph_sizes: got [9]" in err and "1..max_num_seqs (8)" in err


def test_serve_max_cpu_loras_reaches_the_engine(base_dir, no_uvicorn, capsys):
    base = str(base_dir / "base")
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base])
    assert started.value.args[0].state.engine.max_cpu_loras is None
    with pytest.raises(_Started) as started:
        serve.main(["--base-model", base, "--max-loras", "2", "--max-cpu-loras", "3"])
    engine = started.value.args[0].state.engine
    assert engine.max_loras == 2 and engine.max_cpu_loras == 3
    assert serve.main(["--base-model", base, "--max-loras", "3", "--max-cpu-loras", "2"]) not in (0, None)
    assert "max_cpu_loras: got 2" in capsys.readouterr().err
