"""vLLM's request options beyond sampling: ``include_stop_str_in_output``, ``skip_special_tokens``,
``truncate_prompt_tokens`` and the chat template's ``add_generation_prompt`` /
``continue_final_message`` / ``chat_template_kwargs``.

Each against what it must equal: the same request without the option (the text cut at the other
end of the stop string, the special tokens' text, the prompt's last k tokens as their own request,
the template rendered by the tokenizer with those arguments); through the engine and over HTTP,
streamed and not; bad values are 400s naming the field.
"""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from fastadapters.serving.api import create_app
from fastadapters.serving.sampling import SamplingParams
from .char_tokenizer import TEMPLATE, char_tokenizer
from .live_server import live_server
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)


def _tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE + "{% if shout %}X{% endif %}"  # a template variable for chat_template_kwargs
    return tok


def tok_text(engine, ids):
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def _stop_in(text: str) -> tuple[str, int]:
    """A 2-character stop string first found in the middle of ``text``, and where."""
    for i in range(3, len(text) - 3):
        s = text[i:i + 2]
        if text.find(s) == i and " " not in s:
            return s, i
    raise AssertionError(f"no stop string to pick in {text!r}")


def test_include_stop_str_in_output_ends_the_text_after_the_stop(zoo):
    engine = tiny_engine(zoo, tokenizer=_tokenizer(), max_num_seqs=4)
    ps = prompts([6, 9, 7, 8, 5], seed=21)[3:]  # (prompts whose greedy texts do not repeat one character)
    adapters = ["houlsby", "pfeiffer"]
    free = engine.generate(ps, SamplingParams(max_tokens=24, temperature=0), adapters=adapters)
    for p, f, adapter in zip(ps, free, adapters):
        stop, at = _stop_in(f.text)
        cut, kept = engine.generate([p, p], [SamplingParams(max_tokens=24, temperature=0, stop=[stop]),
                                            SamplingParams(max_tokens=24, temperature=0, stop=[stop],
                                                           include_stop_str_in_output=True)],
                                    adapters=[adapter, adapter])
        assert cut.text == f.text[:at] and kept.text == f.text[:at + len(stop)], (stop, f.text)
        assert cut.finish_reason == kept.finish_reason == "stop" and cut.output_ids == kept.output_ids
        # a stop token: its text too is kept with the option (vLLM's), left out without
        k = next(k for k in range(2, len(f.output_ids)) if f.output_ids[k] > 3 and f.output_ids[k] not in
                 f.output_ids[:k])
        by_token = [SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[f.output_ids[k]],
                                   include_stop_str_in_output=inc) for inc in (False, True)]
        cut, kept = engine.generate([p, p], by_token, adapters=[adapter, adapter])
        assert cut.output_ids == kept.output_ids == f.output_ids[:k + 1]
        assert (cut.text, kept.text) == (tok_text(engine, f.output_ids[:k]), tok_text(engine, f.output_ids[:k + 1]))
    assert_no_leaks(engine)


@pytest.fixture(scope="module")
def served(zoo):
    torch.set_num_threads(1)
    engine = tiny_engine(zoo, tokenizer=_tokenizer(), max_num_seqs=4, max_model_len=64)
    with live_server(create_app(engine, "tiny")) as url:
        yield engine, url


def _post(url, path="/v1/completions", **body):
    base = {"model": "tiny", "max_tokens": 8, "temperature": 0}
    if path == "/v1/completions":
        base["prompt"] = "abc"
    return httpx.post(url + path, json={**base, **body}, timeout=60)


def _streamed(url, path, **body):
    with httpx.stream("POST", url + path, json={"model": "tiny", "max_tokens": 8, "temperature": 0, "stream": True,
                                               **body}, timeout=60) as r:
        assert r.status_code == 200
        text = ""
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
        return text


def test_http_stop_string_and_special_tokens(served):
    engine, url = served
    full = _post(url, max_tokens=20).json()["choices"][0]["text"]
    stop, at = _stop_in(full)
    for include, want in ((False, full[:at]), (True, full[:at + len(stop)])):
        r = _post(url, max_tokens=20, stop=[stop], include_stop_str_in_output=include)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (include, r.text)
        assert _streamed(url, "/v1/completions", prompt="abc", max_tokens=20, stop=[stop],
                         include_stop_str_in_output=include) == want
    # a special token (id 1, "<s>") forced by logit_bias: its text appears only with skip_special_tokens false
    for skip, want in ((True, ""), (False, "<s>" * 8)):
        r = _post(url, logit_bias={"1": 100}, skip_special_tokens=skip)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (skip, r.text)
        assert _streamed(url, "/v1/completions", prompt="abc", logit_bias={"1": 100}, skip_special_tokens=skip) == want
    assert_no_leaks(engine)


def test_http_truncate_prompt_tokens_keeps_the_last_tokens(served):
    engine, url = served
    ids = prompts([20], seed=4)[0]
    r = _post(url, prompt=ids, truncate_prompt_tokens=5)
    assert r.status_code == 200, r.text
    alone = _post(url, prompt=ids[-5:]).json()
    assert r.json()["usage"]["prompt_tokens"] == 5 and r.json()["choices"][0]["text"] == alone["choices"][0]["text"]
    r = _post(url, prompt="abcdefghij", truncate_prompt_tokens=3, echo=True, max_tokens=1)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("hij"), r.text  # echo: what was kept
    assert _post(url, prompt=ids, truncate_prompt_tokens=-1).json()["usage"]["prompt_tokens"] == 20
    # a text far beyond what the context could hold: its end is what is kept (no "shorten it" 400)
    long = "xy" * 500 + "abcdefg"
    r = _post(url, prompt=long, truncate_prompt_tokens=5)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5, r.text
    assert r.json()["choices"][0]["text"] == _post(url, prompt=engine.tokenizer("cdefg")["input_ids"][-5:]).json()[
        "choices"][0]["text"]
    assert _post(url, prompt=long).status_code == 400  # without truncation it cannot fit
    r = _post(url, "/v1/chat/completions", messages=[{"role": "user", "content": long}], truncate_prompt_tokens=6)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 6, r.text
    msgs = [{"role": "user", "content": "hello there"}]
    r = _post(url, "/v1/chat/completions", messages=msgs, truncate_prompt_tokens=4)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4, r.text
    for k in (0, -2, 65):
        r = _post(url, prompt=ids, truncate_prompt_tokens=k)
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", (k, r.text)
    assert_no_leaks(engine)


def test_http_chat_template_options(served):
    engine, url = served
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab"}]

    def prompt_tokens(**body):
        r = _post(url, "/v1/chat/completions", messages=msgs, **body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    def rendered(**kw):
        return len(tok(tok.apply_chat_template(msgs, tokenize=False, **kw), add_special_tokens=False)["input_ids"])

    assert prompt_tokens() == rendered(add_generation_prompt=True)
    assert prompt_tokens(add_generation_prompt=False) == rendered(add_generation_prompt=False)
    assert prompt_tokens(add_generation_prompt=False, continue_final_message=True) == \
        rendered(add_generation_prompt=False, continue_final_message=True)
    assert prompt_tokens(chat_template_kwargs={"shout": True}) == rendered(add_generation_prompt=True) + 1
    bad_name = [{"role": "user", "content": "hi", "name": "\ud800x"}]  # a lone surrogate: not Unicode
    r = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                   content=json.dumps({"model": "tiny", "max_tokens": 4, "messages": bad_name}))  # (\ud800 escaped)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    for body, field in ((dict(continue_final_message=True), "continue_final_message"),
                        (dict(chat_template_kwargs={"tokenize": True}), "chat_template_kwargs"),
                        (dict(chat_template="{{ 1 }}"), "chat_template")):
        r = _post(url, "/v1/chat/completions", messages=msgs, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
    assert_no_leaks(engine)


def test_http_chat_echo_puts_the_continued_message_before_the_reply(served):
    # vLLM's chat echo: the reply's content starts with the last message's when the reply continues
    # its role; the continuation itself is the reply without echo, streamed or not, and echo adds
    # no tokens (usage) and no log-probabilities
    engine, url = served
    cont = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab cd"}]
    opts = dict(add_generation_prompt=False, continue_final_message=True, max_tokens=6, logprobs=True, top_logprobs=1)

    def chat(msgs, **body):
        r = _post(url, "/v1/chat/completions", messages=msgs, **body)
        assert r.status_code == 200, r.text
        return r.json()

    plain, echoed = chat(cont, **opts), chat(cont, echo=True, **opts)
    reply = plain["choices"][0]["message"]["content"]
    assert reply and echoed["choices"][0]["message"]["content"] == "ab cd" + reply
    assert echoed["usage"] == plain["usage"]
    assert echoed["choices"][0]["logprobs"] == plain["choices"][0]["logprobs"]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "temperature": 0, "stream": True, "messages": cont, "echo": True,
                            **opts}) as r:
        assert r.status_code == 200
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(d.get("content") or "" for d in deltas) == "ab cd" + reply
    # a reply in a new turn (the last message is the user's) has nothing to continue: echo adds nothing
    ask = [{"role": "user", "content": "hi"}]
    assert chat(ask, echo=True, max_tokens=6)["choices"][0]["message"] == \
        chat(ask, max_tokens=6)["choices"][0]["message"]
    r = _post(url, "/v1/chat/completions", messages=ask, echo=True, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text  # (before the call's grammar)
    assert_no_leaks(engine)


@torch.no_grad()
def _banned_greedy_ref(model, ids, seqs, n):
    """Greedy over the whole sequence each step, a word's last token at -inf where the output so far
    ends with the word's other tokens (vLLM's bad_words rule, written here apart from the engine's)."""
    seq, out = list(ids), []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].double()
        for s in seqs:
            if len(out) >= len(s) - 1 and out[len(out) - (len(s) - 1):] == s[:-1]:
                logits[s[-1]] = float("-inf")
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_bad_words_ban_a_words_last_token_after_its_head(zoo):
    engine = tiny_engine(zoo, tokenizer=_tokenizer(), max_num_seqs=4)
    ps = prompts([6, 9, 7, 8, 5], seed=21)
    free = engine.generate(ps[3:4], SamplingParams(max_tokens=24, temperature=0), adapters=["houlsby"])[0]
    tok = engine.tokenizer
    out = free.output_ids
    i = next(i for i in range(len(out) - 1) if min(out[i:i + 2]) > 3)  # two adjacent letters (no special, space)
    pair = tok.decode(out[i:i + 2])
    seqs = [tok(pair, add_special_tokens=False)["input_ids"], [free.output_ids[0]]]  # a bigram; a single token
    sp = SamplingParams(max_tokens=24, temperature=0, bad_words_ids=seqs)
    got, plain = engine.generate([ps[3], ps[1]], [sp, SamplingParams(max_tokens=24, temperature=0)],
                                 adapters=["houlsby", "lora_r4"])
    import fastadapters as fa

    fa.set_adapter(engine.model, engine.registry.entries["houlsby"].internal)
    try:
        want = _banned_greedy_ref(engine.model, ps[3], seqs, 24)
    finally:
        fa.set_adapter(engine.model, None)
    assert got.output_ids == want and got.output_ids != free.output_ids
    assert pair not in got.text and free.output_ids[0] not in got.output_ids
    assert plain.output_ids == greedy_ref(engine, "lora_r4", ps[1], 24)  # its neighbour: as alone
    assert_no_leaks(engine)


def test_http_bad_words(served):
    engine, url = served
    got = _post(url, max_tokens=20, logprobs=0).json()["choices"][0]
    toks, full = got["logprobs"]["tokens"], got["text"]
    i = next(i for i in range(len(toks) - 1) if all(len(t) == 1 and t != " " for t in toks[i:i + 2]))
    word = toks[i] + toks[i + 1]  # two adjacent letter tokens (no special token, no space)
    assert word in full
    r = _post(url, max_tokens=20, bad_words=[word])
    assert r.status_code == 200 and word not in r.json()["choices"][0]["text"], (word, full, r.text)
    assert _streamed(url, "/v1/completions", prompt="abc", max_tokens=20, bad_words=[word]) == \
        r.json()["choices"][0]["text"]
    for words in ([""], ["x" * 65], ["a"] * 65, [3]):
        r = _post(url, bad_words=words)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("bad_words"), (words, r.text)
    assert_no_leaks(engine)


def test_http_model_retrieval_tokenize_and_detokenize(served):
    engine, url = served
    tok = engine.tokenizer
    r = httpx.get(url + "/v1/models/lora_r4", timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "lora_r4" and r.json()["parent"] == "tiny", r.text
    assert httpx.get(url + "/v1/models/tiny", timeout=30).json()["parent"] is None
    r = httpx.get(url + "/v1/models/nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    r = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": "abc de", "return_token_strs": True}, timeout=30)
    want = tok("abc de")["input_ids"]
    assert r.status_code == 200 and r.json() == {"count": len(want), "max_model_len": 64, "tokens": want,
                                                 "token_strs": [tok.decode([i]) for i in want]}, r.text
    bare = httpx.post(url + "/tokenize", json={"model": "lora_r4", "prompt": "abc", "add_special_tokens": False},
                      timeout=30).json()
    assert bare["tokens"] == tok("abc", add_special_tokens=False)["input_ids"] and bare["token_strs"] is None
    msgs = [{"role": "user", "content": "hello"}]
    counted = httpx.post(url + "/tokenize", json={"model": "tiny", "messages": msgs}, timeout=30).json()["count"]
    assert counted == _post(url, "/v1/chat/completions", messages=msgs).json()["usage"]["prompt_tokens"]
    r = httpx.post(url + "/detokenize", json={"model": "tiny", "tokens": want}, timeout=30)
    assert r.status_code == 200 and r.json() == {"prompt": tok.decode(want)}, r.text
    for path, body, field in (("/tokenize", {"model": "tiny"}, "prompt"),
                              ("/tokenize", {"model": "tiny", "prompt": "a", "messages": msgs}, "prompt"),
                              ("/detokenize", {"model": "tiny", "tokens": [64]}, "tokens"),
                              ("/detokenize", {"model": "tiny", "tokens": [-1]}, "tokens"),
                              ("/tokenize", {"model": "nope", "prompt": "a"}, "model")):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == field, (path, body, r.text)
