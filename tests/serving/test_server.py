"""The HTTP server (fastadapters.serving.api) on a tiny llama with a character tokenizer.

A live uvicorn on a free 127.0.0.1 port, httpx clients. Checks: health, models list, metrics;
completions and chat (plain and streamed) whose greedy text equals the offline single-request run
for the base model and every adapter type; OpenAI-shaped 4xx errors that leave the server serving;
load / unload under --adapter-root with path confinement; 503 on a full queue; a disconnected
stream cancels its request and frees its blocks; dozens of concurrent mixed requests, with bad
requests and a load / unload in between, all answered correctly and nothing leaked.
"""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import time

import httpx
import pytest
import torch

from fastadapters.serving.api import create_app
from .char_tokenizer import char_tokenizer
from .live_server import live_server
from .serve_helpers import ZOO_NAMES, assert_no_leaks, greedy_ref, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)

BASE = "tiny"
NAMES = [BASE] + ZOO_NAMES


@pytest.fixture(scope="module")
def root(tmp_path_factory, zoo):
    r = tmp_path_factory.mktemp("root")
    for name in ("lora_r4", "houlsby", "prefix"):
        shutil.copytree(zoo[name], r / name)
    (r / "link_out").symlink_to(zoo["parallel"])
    return r


def make_engine(zoo, root=None, **kw):
    kw.setdefault("max_num_seqs", 8)
    return tiny_engine(zoo, tokenizer=char_tokenizer(), adapter_roots=[str(root)] if root else None, **kw)


@pytest.fixture(scope="module")
def served(zoo, root):
    torch.set_num_threads(1)
    engine = make_engine(zoo, root)
    with live_server(create_app(engine, BASE, base_path="tiny-llama")) as url:
        yield engine, url


def expected_text(engine, model: str, prompt_ids: list[int], n: int) -> str:
    tokens = greedy_ref(engine, None if model == BASE else model, prompt_ids, n)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err["message"]


def sse(r: httpx.Response) -> list:
    events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_models_metrics(served):
    engine, url = served
    assert httpx.get(f"{url}/health").status_code == 200
    cards = httpx.get(f"{url}/v1/models").json()
    assert cards["object"] == "list"
    by_id = {c["id"]: c for c in cards["data"]}
    assert set(NAMES) <= set(by_id)
    assert by_id[BASE]["root"] == "tiny-llama" and by_id[BASE]["parent"] is None
    for name in ZOO_NAMES:
        assert by_id[name]["parent"] == BASE and by_id[name]["root"].endswith(name)
    httpx.post(f"{url}/v1/completions", json={"model": "houlsby", "prompt": "ab", "max_tokens": 2})
    text = httpx.get(f"{url}/metrics").text
    for metric in ("fastadapters:num_requests_running", "fastadapters:num_requests_waiting",
                   "fastadapters:prompt_tokens_total", "fastadapters:generation_tokens_total",
                   "fastadapters:lora_requests_info{", "fastadapters:http_requests_total{"):
        assert metric in text, metric
    assert 'max_lora="' in text and "running_lora_adapters" in text


def test_models_list_gives_the_base_models_context_length_as_vllm(served):
    # vLLM's base model card has max_model_len (what clients read to size prompts); its adapter cards null
    engine, url = served
    by_id = {c["id"]: c for c in httpx.get(f"{url}/v1/models").json()["data"]}
    assert by_id[BASE]["max_model_len"] == engine.max_model_len
    assert httpx.get(f"{url}/v1/models/{BASE}").json()["max_model_len"] == engine.max_model_len
    assert all(by_id[name]["max_model_len"] is None for name in ZOO_NAMES)


@pytest.mark.parametrize("model", NAMES)
def test_completion_equals_offline_run(served, model):
    engine, url = served
    prompt = "the Cat sat on"
    ids = engine.tokenizer(prompt)["input_ids"]
    want = expected_text(engine, model, ids, 6)
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                    "temperature": 0}, timeout=60)
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}
    # streamed: the same text in pieces, then usage, then [DONE]
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                              "temperature": 0, "stream": True,
                                                              "stream_options": {"include_usage": True}},
                      timeout=60) as s:
        chunks = sse(s)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_chat_plain_and_streamed(served):
    engine, url = served
    messages = [{"role": "user", "content": "hi there"}]
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = expected_text(engine, "pfeiffer", ids, 5)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "pfeiffer", "messages": messages, "max_tokens": 5,
                                                         "temperature": 0}, timeout=60)
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"model": "pfeiffer", "messages": messages,
                                                                   "max_tokens": 5, "temperature": 0,
                                                                   "stream": True}, timeout=60) as s:
        chunks = sse(s)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_text(served):
    engine, url = served
    ids = engine.tokenizer("abc")["input_ids"]
    full = expected_text(engine, BASE, ids, 12)
    stop = full[3:5]
    r = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "abc", "max_tokens": 12,
                                                    "temperature": 0, "stop": [stop]}, timeout=60).json()
    assert r["choices"][0]["text"] == full[:full.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": BASE, "prompt": "abc", "max_tokens": 12,
                                                              "temperature": 0, "stop": stop, "stream": True},
                      timeout=60) as s:
        chunks = sse(s)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(stop)]  # no stop text leaks
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_seeded_sampling_over_http_and_token_counters(served):
    engine, url = served
    before = httpx.get(f"{url}/metrics").text
    body = {"model": "lora_r64", "prompt": "seed me", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9,
            "top_k": 30, "seed": 42}
    texts = [httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
             for _ in range(2)]
    assert texts[0] == texts[1]
    others = {httpx.post(f"{url}/v1/completions", json=dict(body, seed=s), timeout=60).json()["choices"][0]["text"]
              for s in (1, 2, 3)}
    assert len(others | {texts[0]}) > 1  # the seed matters
    after = httpx.get(f"{url}/metrics").text
    gen = "fastadapters:generation_tokens_total"
    assert _metric(after, gen) - _metric(before, gen) == 5 * 8
    prompt_len = len(engine.tokenizer("seed me")["input_ids"])
    assert _metric(after, "fastadapters:prompt_tokens_total") - _metric(before, "fastadapters:prompt_tokens_total") \
        == 5 * prompt_len


def test_a_request_without_model_is_served_by_the_base_as_vllm_does(served):
    # vLLM's request bodies make `model` optional: left out (or empty) it names the base model, and the
    # reply names the base; clients written against vLLM (curl scripts, tools) send none
    engine, url = served
    body = {"prompt": "abc", "max_tokens": 5, "temperature": 0}
    named = httpx.post(f"{url}/v1/completions", json={**body, "model": BASE}, timeout=60).json()
    for extra in ({}, {"model": None}, {"model": ""}):
        r = httpx.post(f"{url}/v1/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["model"] == BASE and r.json()["choices"][0]["text"] == named["choices"][0]["text"]
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200 and r.json()["model"] == BASE, r.text
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        assert {c["model"] for c in sse(r)} == {BASE}
    r = httpx.post(f"{url}/tokenize", json={"prompt": "abc"}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"] == engine.tokenizer("abc")["input_ids"], r.text
    r = httpx.post(f"{url}/detokenize", json={"tokens": [3, 4]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"prompt": engine.tokenizer.decode([3, 4])}, r.text
    assert_no_leaks(engine)


def test_errors_are_openai_shaped_4xx_and_change_nothing(served):
    engine, url = served
    before = httpx.get(f"{url}/v1/models").json()
    post = lambda path, **kw: httpx.post(f"{url}{path}", timeout=30, **kw)  # noqa: E731
    assert "nope" in error_of(post("/v1/completions", json={"model": "nope", "prompt": "a"}), 404)
    error_of(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "max_tokens" in error_of(post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": "5"}),
                                    400)
    assert "max_tokens" in error_of(post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 0}),
                                    400)
    assert "max_model_len" in error_of(post("/v1/completions", json={"model": BASE, "prompt": "a" * 200}), 400)
    for n in (0, 17):
        r = post("/v1/completions", json={"model": BASE, "prompt": "a", "n": n})
        assert "n: got" in error_of(r, 400) and r.json()["error"]["param"] == "n"
    r = post("/v1/completions", json={"model": BASE, "prompt": "a", "logprobs": 30})
    assert "logprobs" in error_of(r, 400) and r.json()["error"]["param"] == "logprobs"
    error_of(post("/v1/chat/completions", json={"model": BASE, "messages": []}), 400)
    error_of(post("/v1/chat/completions", json={"model": BASE, "messages": "hi"}), 400)
    assert "outside" in error_of(post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}), 403)
    assert "outside" in error_of(post("/v1/load_lora_adapter", json={"lora_name": "x",
                                                                     "lora_path": str(_root(engine) / "link_out")}), 403)
    error_of(post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(_root(engine))}), 400)
    assert "already loaded" in error_of(post("/v1/load_lora_adapter", json={
        "lora_name": "houlsby", "lora_path": str(_root(engine) / "houlsby")}), 400)
    error_of(post("/v1/unload_lora_adapter", json={"lora_name": "x"}), 404)
    error_of(httpx.get(f"{url}/v1/nothing"), 404)
    assert httpx.get(f"{url}/v1/models").json()["data"] == before["data"]
    r = post("/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200


def _root(engine):
    import pathlib

    return pathlib.Path(engine.adapter_roots[0])


def test_load_unload_at_runtime_every_type(served):
    engine, url = served
    root = _root(engine)
    ids = engine.tokenizer("xyz")["input_ids"]
    for src in ("lora_r4", "houlsby", "prefix"):
        name = f"rt_{src}"
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / src)}, timeout=60)
        assert r.status_code == 200, r.text
        out = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "xyz", "max_tokens": 4,
                                                          "temperature": 0}, timeout=60).json()
        assert out["choices"][0]["text"] == expected_text(engine, src, ids, 4)
        assert name in {c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]}
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        error_of(httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "xyz"}), 404)


def test_disconnect_mid_stream_frees_blocks(zoo):
    engine = make_engine(zoo, max_model_len=4096)  # room for a stream that outlives the client
    with live_server(create_app(engine, BASE)) as url:
        body = {"model": "lora_r64", "prompt": "abc", "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(g.startswith("data: ") for g in got)
            assert engine.snapshot()["live_requests"] == 1 and engine.pool.used_blocks > 0
        deadline = time.monotonic() + 20
        while engine.snapshot()["live_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_no_leaks(engine)
        assert engine.stats["finished_abort"] == 1
        assert httpx.get(f"{url}/health").status_code == 200


def test_full_queue_answers_503_at_once(zoo):
    engine = make_engine(zoo, max_num_seqs=1, max_waiting=1, max_model_len=4096)
    with live_server(create_app(engine, BASE)) as url:
        long = {"model": BASE, "prompt": "a", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/v1/completions", json=long) as one:
                assert one.status_code == 200
                # running (it streamed a token): the next request waits rather than meeting this one still
                # queued on a busy machine
                lines = one.iter_lines()  # (kept: a collected line iterator closes the stream)
                while not next(lines).startswith("data: "):
                    pass
                two = client.send(client.build_request("POST", f"{url}/v1/completions", json=long), stream=True)
                assert two.status_code == 200
                deadline = time.monotonic() + 10  # (submitted; the engine thread takes it in at its next step)
                while (snap := engine.snapshot())["running"] + snap["waiting"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert snap["running"] + snap["waiting"] == 2, snap  # one running, one queued: full
                t = time.monotonic()
                r = httpx.post(f"{url}/v1/completions", json=dict(long, stream=False), timeout=30)
                assert time.monotonic() - t < 5
                assert "retry" in error_of(r, 503)
                two.close()
            # both streams closed: their requests are aborted and the queue drains
        deadline = time.monotonic() + 20
        while engine.snapshot()["live_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": "a", "max_tokens": 2}).status_code == 200
    assert_no_leaks(engine)


def test_concurrent_mixed_traffic_with_faults(zoo, root):
    engine = make_engine(zoo, root, max_num_seqs=6, block_size=4)
    prompts = ["a", "hello there", "xyz", "the Cat sat on the mat", "Q", "bb cc"]
    jobs = []
    for i in range(30):
        jobs.append((NAMES[i % len(NAMES)], prompts[i % len(prompts)], 3 + i % 5, i % 3 == 0))
    want = {}
    for model, prompt, n, _ in jobs:  # offline references, before the engine thread runs
        want[(model, prompt, n)] = expected_text(engine, model, engine.tokenizer(prompt)["input_ids"], n)

    def one(job):
        model, prompt, n, stream = job
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
        if stream:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as s:
                assert s.status_code == 200
                return "".join(c["choices"][0]["text"] for c in sse(s))
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def bad(i):
        body = [{"model": "nope", "prompt": "a"}, {"model": BASE, "prompt": "a", "max_tokens": -1},
                {"model": BASE, "prompt": 5}][i % 3]
        return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code

    with live_server(create_app(engine, BASE)) as url:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            good = [pool.submit(one, j) for j in jobs]
            bads = [pool.submit(bad, i) for i in range(6)]
            load = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(root / "houlsby")},
                              timeout=60)
            unload = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
            results = [f.result() for f in good]
            assert sorted(f.result() for f in bads) == [400] * 4 + [404] * 2
        assert load.status_code == 200 and unload.status_code == 200
        for job, text in zip(jobs, results):
            assert text == want[job[:3]], job
        assert httpx.get(f"{url}/health").status_code == 200
        assert_no_leaks(engine)
