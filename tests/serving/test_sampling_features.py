"""Sampling features of the serving engine and server: logits processors and token stops
(sampling.py: OpenAI's presence / frequency penalties and logit_bias, vLLM's repetition_penalty,
min_tokens, min_p and stop_token_ids), log-probabilities, and ``n`` choices per request.

References are independent of the engine: transformers' own ``generate`` processors where it has
them (repetition penalty, min_new_tokens), else a plain greedy loop over the whole sequence with the
OpenAI formula applied in fp64. Each request is batched with other requests (base and adapters)
whose tokens must equal their runs alone. Log-probabilities against an fp64 log-softmax of the
model run alone. Over HTTP: the fields reach the engine, bad values are 400s naming the field,
result-changing fields the server lacks are 400s, unknown fields are logged; logprobs in OpenAI's
completions and chat shapes, streamed and not; ``n`` choices equal to n single requests of seeds
seed + i, streamed per choice index, usage counting the prompt once.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import fastadapters as fa
from fastadapters.serving.api import create_app
from fastadapters.serving.sampling import LogitsState, SamplingParams, _draw, process_rows, token_logprobs
from .char_tokenizer import char_tokenizer
from .live_server import live_server
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)

N = 8


def test_process_rows_matches_an_fp64_reference_odd_vocab():
    vocab, g = 67, torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g) * 3
    prompt, out = [5, 9, 9, 66], [9, 12, 12, 12, 40]
    p = SamplingParams(max_tokens=20, presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.3,
                       logit_bias={3: 5.5, 12: -2.0}, min_tokens=8, stop_token_ids=[40])
    p.validate(vocab_size=vocab)
    st = LogitsState(p, vocab, "cpu", eos_ids={2})
    st.update(prompt, out[:2])
    st.update(prompt, out)  # only the three new tokens are added
    before = logits.clone()
    got = process_rows(logits, [1], [st], [len(out)])
    assert torch.equal(logits, before)  # the input is not written
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])  # other rows untouched
    ref = logits[1].double().clone()
    for t, b in p.logit_bias.items():
        ref[t] += b
    ref[[2, 40]] = float("-inf")  # min_tokens: EOS and the stop token held back (5 < 8 tokens)
    for t in set(prompt) | set(out):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(out):
        ref[t] -= out.count(t) * -0.4 + 0.7
    torch.testing.assert_close(got[1].double(), ref, rtol=0, atol=1e-5)
    # once the output is min_tokens long the stop tokens are free again
    st.update(prompt, out + [1, 1, 1])
    assert torch.isfinite(process_rows(logits, [1], [st], [8])[1]).all()
    assert st.counted == 8 and st.counts[1] == 3


def test_min_p_draws_only_tokens_near_the_most_likely():
    x = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    g = torch.Generator().manual_seed(1)
    drawn = {int(_draw(x, SamplingParams(temperature=1.0, min_p=0.25), g)) for _ in range(300)}
    assert drawn == {0, 1}  # p >= 0.25 * 0.5
    drawn = {int(_draw(x, SamplingParams(temperature=1.0), g)) for _ in range(300)}
    assert drawn == {0, 1, 2, 3, 4}  # without min_p every token is reachable


@pytest.mark.parametrize("bad, field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias={64: 1.0}), "logit_bias"),
    (dict(logit_bias={3: 101}), "logit_bias"), (dict(min_tokens=9), "min_tokens"), (dict(min_p=1.5), "min_p"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=[True]), "stop_token_ids")])
def test_bad_values_are_refused_with_the_field_named(zoo, bad, field):
    engine = tiny_engine()
    with pytest.raises(ValueError, match=f"^{field}: got .*valid: "):
        engine.submit([5, 6, 7], SamplingParams(max_tokens=N, temperature=0, **bad))
    assert engine.snapshot()["waiting"] == 0


def _base(engine):
    """The engine's model with no adapter active (``greedy_ref`` leaves the last one it ran active)."""
    if fa.adapter_names(engine.model):
        fa.set_adapter(engine.model, None)
    return engine.model


def _penalized_ref(model, ids, n, presence, frequency):
    """Greedy with OpenAI's presence / frequency penalties, the whole sequence run at every step."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].double()
            for t in set(out):
                logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
    return out


def _batched(engine, special, ps, others):
    """Run ``special`` (prompt, params) with ``others`` (prompt, adapter) batched beside it; return
    (the special request, the other requests)."""
    plain = SamplingParams(max_tokens=N, temperature=0)
    reqs = [engine.submit(p, plain, adapter=a) for p, a in others[:1]]
    mine = engine.submit(ps, special)
    reqs += [engine.submit(p, plain, adapter=a) for p, a in others[1:]]
    engine.run_until_done()
    for r, (p, a) in zip(reqs, others):
        assert r.output_ids == greedy_ref(engine, a, p, N), a  # the neighbours are untouched
    return mine


def test_penalties_and_bias_in_a_mixed_batch_equal_their_references(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4)
    ps = prompts([5, 9, 3, 7], seed=11)
    others = [(ps[1], None), (ps[2], "lora_r4"), (ps[3], "houlsby")]
    # presence / frequency: a fp64 greedy loop with OpenAI's formula
    r = _batched(engine, SamplingParams(max_tokens=N, temperature=0, presence_penalty=1.5, frequency_penalty=1.0),
                 ps[0], others)
    ref = _penalized_ref(_base(engine), ps[0], N, 1.5, 1.0)
    assert r.output_ids == ref and r.output_ids != greedy_ref(engine, None, ps[0], N)  # the penalty mattered
    # repetition penalty: transformers' own processor (the prompt's and the output's tokens)
    r = _batched(engine, SamplingParams(max_tokens=N, temperature=0, repetition_penalty=1.8), ps[0], others)
    with torch.no_grad():
        hf = _base(engine).generate(torch.tensor([ps[0]]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                   repetition_penalty=1.8)[0, len(ps[0]):].tolist()
    assert r.output_ids == hf and hf != greedy_ref(engine, None, ps[0], N)
    # logit_bias: +100 makes a token certain; -100 takes the greedy first token away
    r = _batched(engine, SamplingParams(max_tokens=N, temperature=0, logit_bias={17: 100}), ps[0], others)
    assert r.output_ids == [17] * N
    first = greedy_ref(engine, None, ps[0], 1)[0]
    r = _batched(engine, SamplingParams(max_tokens=N, temperature=0, logit_bias={first: -100}), ps[0], others)
    with torch.no_grad():
        logits = _base(engine)(torch.tensor([ps[0]])).logits[0, -1]
    assert r.output_ids[0] == int(logits.topk(2).indices[1]) != first
    # sampled rows take the processors too: a certain token stays certain at temperature 1
    r = _batched(engine, SamplingParams(max_tokens=N, temperature=1.0, seed=3, logit_bias={23: 100}), ps[0], others)
    assert r.output_ids == [23] * N
    assert_no_leaks(engine)


def test_min_tokens_holds_back_eos_as_min_new_tokens_does(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4)
    ps = prompts([6, 4, 8], seed=5)
    eos = greedy_ref(engine, None, ps[0], 1)[0]  # the base model's first greedy token, made the EOS
    engine.eos_ids = {eos}
    r = engine.generate([ps[0]], SamplingParams(max_tokens=N, temperature=0))[0]
    assert r.output_ids == [eos] and r.finish_reason == "stop"
    r = _batched(engine, SamplingParams(max_tokens=N, temperature=0, min_tokens=5), ps[0],
                 [(ps[1], "lora_r64"), (ps[2], "parallel")])
    with torch.no_grad():
        hf = _base(engine).generate(torch.tensor([ps[0]]), max_new_tokens=N, min_new_tokens=5, do_sample=False,
                                   eos_token_id=eos, pad_token_id=0)[0, len(ps[0]):].tolist()
    hf = hf[:hf.index(eos) + 1] if eos in hf else hf
    assert r.output_ids == hf and len(hf) >= 5 and eos not in hf[:5]
    assert r.finish_reason == ("stop" if hf[-1] == eos else "length")
    assert_no_leaks(engine)


def test_a_stop_token_ends_the_request_and_its_text_is_left_out(zoo):
    engine = tiny_engine(zoo, tokenizer=char_tokenizer(), max_num_seqs=4, block_size=4)
    tok = engine.tokenizer
    ids = tok("hello there")["input_ids"]
    g = greedy_ref(engine, "lora_r4", ids, 16)
    k = next(i for i in range(1, 16) if g[i] not in g[:i])  # the first token that repeats none before it
    outs = []
    r = engine.submit(ids, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[g[k]]), adapter="lora_r4",
                      on_output=outs.append)
    other = engine.submit(ids, SamplingParams(max_tokens=16, temperature=0), adapter="lora_r4")
    engine.run_until_done()
    assert r.output_ids == g[:k + 1] and r.finish_reason == "stop"
    assert "".join(o.text for o in outs) == tok.decode(g[:k]) and outs[-1].finish_reason == "stop"
    assert other.output_ids == g  # the same prompt and adapter without the stop token runs on
    # the same with the engine's thread, where the output thread makes the text
    engine.start()
    try:
        done, outs = threading.Event(), []
        engine.submit(ids, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[g[k]]), adapter="lora_r4",
                      on_output=lambda o: (outs.append(o), o.finished and done.set()))
        assert done.wait(60)
    finally:
        engine.stop()
    assert "".join(o.text for o in outs) == tok.decode(g[:k]) and outs[-1].finish_reason == "stop"
    assert outs[-1].completion_tokens == k + 1
    # min_tokens holds a stop token back too
    r = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[g[0]], min_tokens=3),
                        ["lora_r4"])[0]
    assert len(r.output_ids) >= 3 and g[0] not in r.output_ids[:3]
    assert_no_leaks(engine)


def _ref_logprobs(engine, adapter, ids, out):
    """fp64 log-softmax of the model alone (``adapter`` active) at each output position."""
    model = _base(engine)
    if adapter is not None:
        fa.set_adapter(model, engine.registry.entries[adapter].internal)
    with torch.no_grad():
        logits = model(torch.tensor([ids + out])).logits[0, len(ids) - 1:len(ids) + len(out) - 1]
    return torch.log_softmax(logits.double(), -1)


def test_logprobs_equal_an_fp64_reference_in_a_mixed_batch(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4)
    ps = prompts([5, 9, 3], seed=21)
    outs = {}
    greedy3 = engine.submit(ps[0], SamplingParams(max_tokens=N, temperature=0, logprobs=3), adapter="lora_r64",
                            on_output=lambda o: outs.setdefault("a", []).append(o))
    plain = engine.submit(ps[1], SamplingParams(max_tokens=N, temperature=0), adapter="houlsby",
                          on_output=lambda o: outs.setdefault("b", []).append(o))
    sampled0 = engine.submit(ps[2], SamplingParams(max_tokens=N, temperature=1.0, seed=5, logprobs=0,
                                                   presence_penalty=1.0),
                             on_output=lambda o: outs.setdefault("c", []).append(o))
    engine.run_until_done()
    assert all(o.logprobs is None for o in outs["b"])
    assert plain.output_ids == greedy_ref(engine, "houlsby", ps[1], N)
    for req, key, adapter, k in ((greedy3, "a", "lora_r64", 3), (sampled0, "c", None, 0)):
        entries = [e for o in outs[key] for e in o.logprobs]
        assert [e[0] for e in entries] == req.output_ids  # one entry per token, in order
        ref = _ref_logprobs(engine, adapter, ps[0] if key == "a" else ps[2], req.output_ids)
        for pos, (tok, lp, top) in enumerate(entries):
            # the raw model's log-probability, not the penalised one (vLLM's default)
            assert abs(lp - ref[pos, tok].item()) < 1e-4, (key, pos)
            assert len(top) == k
            want = ref[pos].topk(k)
            assert [i for i, _ in top] == want.indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(top, want.values.tolist())) < 1e-4 if k else True
    assert greedy3.output_ids == greedy_ref(engine, "lora_r64", ps[0], N)
    assert all(e[2][0][0] == e[0] for o in outs["a"] for e in o.logprobs)  # greedy: the top token is the one taken
    assert_no_leaks(engine)


@pytest.mark.parametrize("adapter", [None, "lora_r64", "houlsby", "prefix"])
def test_prompt_logprobs_equal_an_fp64_reference_chunked_and_batched(zoo, adapter):
    # chunks of 4 tokens: a prompt's log-probabilities come from several steps, beside other requests
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4, chunk_size=4, token_budget=8)
    ps = prompts([11, 6, 9], seed=31)
    engine.generate([ps[0]], SamplingParams(max_tokens=2, temperature=0), [adapter])  # its blocks now cached
    outs = []
    mine = engine.submit(ps[0], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, prompt_ranks=True),
                         adapter=adapter,
                         on_output=outs.append)
    others = [engine.submit(p, SamplingParams(max_tokens=3, temperature=0), adapter=a)
              for p, a in ((ps[1], "parallel"), (ps[2], None))]
    engine.run_until_done()
    assert mine.output_ids == greedy_ref(engine, adapter, ps[0], 3)
    for r, (p, a) in zip(others, ((ps[1], "parallel"), (ps[2], None))):
        assert r.output_ids == greedy_ref(engine, a, p, 3)
    got = outs[0].prompt_logprobs
    assert all(o.prompt_logprobs is None for o in outs[1:])
    model = _base(engine)
    if adapter is not None:
        fa.set_adapter(model, engine.registry.entries[adapter].internal)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ps[0]])).logits[0].double(), -1)
    assert got[0] is None and len(got) == len(ps[0])
    for pos in range(1, len(ps[0])):
        tok, lp, top, rank = got[pos]
        assert tok == ps[0][pos] and abs(lp - ref[pos - 1, tok].item()) < 1e-4, pos
        assert [i for i, _ in top] == ref[pos - 1].topk(2).indices.tolist()
        assert rank == int((ref[pos - 1] >= ref[pos - 1, tok]).sum()), pos  # vLLM's rank: 1 = the most likely
    assert_no_leaks(engine)


@pytest.fixture(scope="module")
def served(zoo):
    torch.set_num_threads(1)
    engine = tiny_engine(zoo, tokenizer=char_tokenizer(), max_num_seqs=4)
    app = create_app(engine, "tiny")
    with live_server(app) as url:
        yield engine, app, url


def _post(url, **body):
    return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 4,
                                                     "temperature": 0, **body}, timeout=60)


def test_http_fields_reach_the_engine_and_bad_ones_are_400s(served, caplog):
    engine, app, url = served
    r = _post(url, logit_bias={"30": 100})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode([30] * 4)
    r = _post(url, allowed_token_ids=[31])
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == engine.tokenizer.decode([31] * 4), r.text
    r = _post(url, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.1, min_tokens=2,
              stop_token_ids=[5])
    assert r.status_code == 200, r.text
    for body, field in ((dict(logit_bias={"abc": 1}), "logit_bias"), (dict(logit_bias={"64": 1}), "logit_bias"),
                        (dict(presence_penalty=3), "presence_penalty"), (dict(min_tokens=9), "min_tokens"),
                        (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(bad_words=[""]), "bad_words"),
                        (dict(presence_penalty="1"), None),
                        (dict(response_format={"type": "structural_tag"}), "response_format"),
                        (dict(guided_whitespace_pattern=" *"), "guided_whitespace_pattern"),
                        (dict(use_beam_search=True), "use_beam_search"),
                        (dict(spaces_between_special_tokens=False), "spaces_between_special_tokens")):
        r = _post(url, **body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and (field is None or err["param"] == field), (body, err)
    # the values that ask for nothing are served
    r = _post(url, response_format={"type": "text"}, guided_json=None, use_beam_search=False, metadata={"a": "b"})
    assert r.status_code == 200, r.text
    # a field the server does not know is served and logged once by name
    with caplog.at_level("WARNING", logger="fastadapters.serve"):
        for _ in range(2):
            assert _post(url, frobnicate_level=3).status_code == 200
    said = [m for m in caplog.messages if "frobnicate_level" in m]
    assert len(said) == 1 and "ignored" in said[0]
    assert "frobnicate_level" in app.state.ignored_fields and "metadata" not in app.state.ignored_fields
    # a client sending any number of names cannot grow what the server keeps
    many = {f"{i}{'x' * 100}": i for i in range(300)}
    assert _post(url, **many).status_code == 200
    assert len(app.state.ignored_fields) == 256 and max(map(len, app.state.ignored_fields)) <= 60
    # chat without max_tokens: min_tokens is checked against the room the context leaves, not 1
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"model": "tiny", "min_tokens": 3, "temperature": 0,
                                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 3, r.text
    assert_no_leaks(engine)


def test_http_logprobs_in_openai_shapes_streamed_and_not(served):
    engine, app, url = served
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=dict(body, logprobs=2), timeout=60).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    ids = engine.tokenizer("hello")["input_ids"]
    out = greedy_ref(engine, None, ids, 5)
    ref = _ref_logprobs(engine, None, ids, out)
    assert "".join(lp["tokens"]) == choice["text"] == engine.tokenizer.decode(out)
    r0 = httpx.post(url + "/v1/completions", json=dict(body, logprobs=0), timeout=60).json()["choices"][0]["logprobs"]
    assert r0["top_logprobs"] == [{t: v} for t, v in zip(r0["tokens"], r0["token_logprobs"])]  # the chosen one
    assert lp["text_offset"] == [0, 1, 2, 3, 4]  # one character per token
    for pos, t in enumerate(out):
        assert abs(lp["token_logprobs"][pos] - ref[pos, t].item()) < 1e-4
        assert list(lp["top_logprobs"][pos]) == [engine.tokenizer.decode([i]) for i in ref[pos].topk(2).indices]
    streamed = httpx.post(url + "/v1/completions", json=dict(body, logprobs=2, stream=True), timeout=60)
    chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    got = {k: [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"][k]]
           for k in ("tokens", "token_logprobs", "text_offset")}
    assert got["tokens"] == lp["tokens"] and got["text_offset"] == lp["text_offset"]
    assert max(abs(a - b) for a, b in zip(got["token_logprobs"], lp["token_logprobs"])) < 1e-5
    # chat: logprobs true, top_logprobs k
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=dict(chat, logprobs=True, top_logprobs=1), timeout=60).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
    for c in content:
        assert c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 1
        assert c["top_logprobs"][0]["token"] == c["token"] and c["top_logprobs"][0]["logprob"] == c["logprob"]
    streamed = httpx.post(url + "/v1/chat/completions", json=dict(chat, logprobs=True, stream=True), timeout=60)
    chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    items = [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["content"]]
    assert [x["token"] for x in items] == [c["token"] for c in content]
    # (to fp32 rounding: the second request's prompt comes from the prefix cache, its logits from other shapes)
    assert max(abs(x["logprob"] - c["logprob"]) for x, c in zip(items, content)) < 1e-5
    assert all(x["top_logprobs"] == [] for x in items)
    assert_no_leaks(engine)


def test_http_n_choices_are_n_seeded_requests_streamed_per_index(served):
    engine, app, url = served
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    one = [httpx.post(url + "/v1/completions", json=dict(body, seed=7 + i), timeout=60).json() for i in range(3)]
    r = httpx.post(url + "/v1/completions", json=dict(body, n=3), timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert [c["text"] for c in r["choices"]] == [o["choices"][0]["text"] for o in one]
    assert len({c["text"] for c in r["choices"]}) > 1  # different seeds, different samples
    prompt = one[0]["usage"]["prompt_tokens"]
    assert r["usage"] == {"prompt_tokens": prompt, "completion_tokens": 18, "total_tokens": prompt + 18}
    # streamed chat, with log-probabilities and usage: a role chunk per choice, then each choice's own chunks
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "n": 2, "logprobs": True}
    whole = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
    assert whole["choices"][0]["message"] == whole["choices"][1]["message"]  # greedy: the same answer twice
    streamed = httpx.post(url + "/v1/chat/completions", timeout=60,
                          json=dict(chat, stream=True, stream_options={"include_usage": True}))
    lines = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and lines.count("[DONE]") == 1
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == whole["choices"][i]["message"]["content"]
        assert mine[-1]["finish_reason"] == whole["choices"][i]["finish_reason"] == "length"
        tokens = [x["token"] for c in mine if c["logprobs"] for x in c["logprobs"]["content"]]
        assert tokens == [x["token"] for x in whole["choices"][i]["logprobs"]["content"]]
    assert_no_leaks(engine)


def test_http_continuous_usage_stats_put_each_choices_counts_in_every_chunk(served):
    # vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries its choice's
    # usage so far -- the prompt's tokens and the tokens generated until that chunk -- and the last chunk
    # the whole request's; without continuous_usage_stats the chunks' usage stays null
    engine, app, url = served
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 6, "temperature": 0, "n": 2, "logprobs": 0,
            "stream": True}
    for path, extra in (("/v1/completions", {}),
                        ("/v1/chat/completions", {"prompt": None, "logprobs": True,
                                                  "messages": [{"role": "user", "content": "hi"}]})):
        req = {k: v for k, v in {**body, **extra}.items() if v is not None}
        whole = httpx.post(url + path, json=dict(req, stream=False), timeout=60).json()["usage"]
        r = httpx.post(url + path, json=dict(req, stream_options=opts), timeout=60)
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(x) for x in lines[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole
        sent = [0, 0]  # tokens whose log-probabilities each choice's chunks carried so far
        for c in chunks[:-1]:
            i, lp = c["choices"][0]["index"], c["choices"][0]["logprobs"]
            sent[i] += 0 if lp is None else len(lp["content"] if "content" in lp else lp["tokens"])
            assert c["usage"] == {"prompt_tokens": whole["prompt_tokens"], "completion_tokens": sent[i],
                                  "total_tokens": whole["prompt_tokens"] + sent[i]}, (path, c)
        assert sent == [6, 6] and whole["completion_tokens"] == 12
        plain = httpx.post(url + path, json=dict(req, stream_options={"include_usage": True}), timeout=60)
        chunks = [json.loads(line[6:]) for line in plain.iter_lines() if line.startswith("data: {")]
        assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"] == whole
        # stream_options on a request that does not stream: refused (OpenAI and vLLM too), not ignored
        r = httpx.post(url + path, json=dict(req, stream=False, stream_options=opts), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
        assert "only read with stream: true" in r.json()["error"]["message"]
    assert_no_leaks(engine)


def test_http_n_choices_are_all_or_none_and_freed_together(zoo):
    engine = tiny_engine(zoo, tokenizer=char_tokenizer(), max_num_seqs=1, max_waiting=3, max_model_len=4096)
    long = {"model": "tiny", "prompt": "a", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with live_server(create_app(engine, "tiny")) as url:
        # more choices than the queue can ever hold: a 400 naming n, not a 503 that retrying cannot cure
        r = httpx.post(f"{url}/v1/completions", json=dict(long, stream=False, n=4), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--max-waiting" in r.text
        r = httpx.post(f"{url}/v1/completions", json=dict(long, stream=False, n=4, prompt=["a", "b"]), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # n alone is too large: named
        # a batch with one prompt that cannot fit: the 400 says which, and nothing of the batch runs
        r = httpx.post(f"{url}/v1/completions", json=dict(long, stream=False, prompt=["a", "b" * 200]), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt[1]: ")
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/v1/completions", json=long) as one, \
                    client.stream("POST", f"{url}/v1/completions", json=long) as two:
                assert one.status_code == two.status_code == 200  # one running, one queued
                # three choices cannot queue behind them (room for two): none of them is served
                r = httpx.post(f"{url}/v1/completions", json=dict(long, stream=False, n=3), timeout=30)
                assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
                deadline = time.monotonic() + 20
                while engine.snapshot()["live_requests"] > 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert engine.snapshot()["live_requests"] == 2  # the two queued choices were withdrawn
            # a client that leaves a stream of two choices frees both
            with client.stream("POST", f"{url}/v1/completions", json=dict(long, n=2)) as both:
                lines = both.iter_lines()
                assert any(next(lines).startswith("data: ") for _ in range(3))
        deadline = time.monotonic() + 20
        while engine.snapshot()["live_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_no_leaks(engine)
        # prompt[0] of the refused batch and 2 choices withdrawn, the two streams, both choices of the third
        assert engine.stats["finished_abort"] == 7, engine.stats


def test_http_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(served):
    engine, app, url = served
    # lm-eval-harness's loglikelihood request: echo, logprobs 1, one token, greedy
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    httpx.post(url + "/v1/completions", json=dict(body, echo=False, logprobs=None), timeout=60)  # prompt cached
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    choice = r["choices"][0]
    ids = engine.tokenizer("hello world")["input_ids"]
    out = greedy_ref(engine, None, ids, 1)
    assert choice["text"] == "hello world" + engine.tokenizer.decode(out)
    lp = choice["logprobs"]
    assert lp["tokens"] == list("hello world") + [engine.tokenizer.decode(out)]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == list(range(len(ids) + 1))
    with torch.no_grad():
        ref = torch.log_softmax(_base(engine)(torch.tensor([ids + out])).logits[0].double(), -1)
    for pos in range(1, len(ids) + 1):
        tok = (ids + out)[pos]
        assert abs(lp["token_logprobs"][pos] - ref[pos - 1, tok].item()) < 1e-4, pos
        # the most likely token and the chosen one (vLLM's and OpenAI's legacy completions form)
        want = {engine.tokenizer.decode([int(ref[pos - 1].argmax())]), engine.tokenizer.decode([tok])}
        assert set(lp["top_logprobs"][pos]) == want, pos
    # streamed: the prompt comes first, the concatenation is the same
    s = httpx.post(url + "/v1/completions", json=dict(body, stream=True, max_tokens=3), timeout=60)
    chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith("hello world" + engine.tokenizer.decode(out)) and len(text) == len(ids) + 3
    assert chunks[0]["choices"][0]["text"].startswith("hello world")
    tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert "".join(tokens) == text
    # echo without logprobs: the text only; a token-id prompt is echoed as its decoding
    r = httpx.post(url + "/v1/completions", json=dict(body, prompt=ids, logprobs=None), timeout=60).json()
    assert r["choices"][0]["text"].startswith("hello world") and r["choices"][0]["logprobs"] is None
    assert_no_leaks(engine)


def _check_prompt_logprobs(engine, got, ids, k):
    """vLLM's prompt_logprobs shape against an fp64 reference: None first, then per prompt token
    {id: {logprob, rank, decoded_token}}, the prompt token first (its rank in the vocabulary) and
    the k most likely with ranks 1..k."""
    with torch.no_grad():
        ref = torch.log_softmax(_base(engine)(torch.tensor([ids])).logits[0].double(), -1)
    assert len(got) == len(ids) and got[0] is None
    for pos in range(1, len(ids)):
        tok, row = ids[pos], ref[pos - 1]
        entry = got[pos]
        assert next(iter(entry)) == str(tok), pos  # the prompt token first
        top = row.topk(k).indices.tolist()
        assert set(entry) == {str(tok), *map(str, top)}, pos
        for r, j in enumerate(top, 1):
            assert entry[str(j)]["rank"] == r and abs(entry[str(j)]["logprob"] - row[j].item()) < 1e-4
        if tok not in top:
            assert entry[str(tok)]["rank"] == int((row >= row[tok]).sum()) > k
        assert abs(entry[str(tok)]["logprob"] - row[tok].item()) < 1e-4
        assert all(v["decoded_token"] == engine.tokenizer.decode([int(i)]) for i, v in entry.items())


def test_http_vllm_prompt_logprobs_completions_and_chat(served):
    engine, app, url = served
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    ids = engine.tokenizer("hello world")["input_ids"]
    r = httpx.post(url + "/v1/completions", json=dict(body, n=2), timeout=60).json()
    for choice in r["choices"]:  # each choice carries its prompt's
        _check_prompt_logprobs(engine, choice["prompt_logprobs"], ids, 3)
        assert choice["logprobs"] is None
        assert choice["text"] == engine.tokenizer.decode(greedy_ref(engine, None, ids, 2))
    # with echo and logprobs 2 beside it: each answer its own k
    r = httpx.post(url + "/v1/completions", json=dict(body, prompt_logprobs=0, echo=True, logprobs=2),
                   timeout=60).json()
    _check_prompt_logprobs(engine, r["choices"][0]["prompt_logprobs"], ids, 0)
    assert all(v is None or len(v) <= 3 for v in r["choices"][0]["logprobs"]["top_logprobs"])
    assert max(len(v) for v in r["choices"][0]["logprobs"]["top_logprobs"][1:]) == 3  # two and the chosen one
    r = httpx.post(url + "/v1/completions", json=dict(body, echo=True, logprobs=1), timeout=60).json()  # the other way
    _check_prompt_logprobs(engine, r["choices"][0]["prompt_logprobs"], ids, 3)
    assert max(len(v) for v in r["choices"][0]["logprobs"]["top_logprobs"][1:]) == 2  # one and the chosen one
    # chat: one list at the top, for the templated prompt
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=dict(chat, prompt_logprobs=1), timeout=60).json()
    cids = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True)
    cids = engine.tokenizer(cids, add_special_tokens=False)["input_ids"]
    _check_prompt_logprobs(engine, r["prompt_logprobs"], cids, 1)
    assert "prompt_logprobs" not in r["choices"][0]
    # not asked: no field; refused as vLLM refuses (stream with k > 0), and beyond 20 or -1
    r = httpx.post(url + "/v1/completions", json=dict(body, prompt_logprobs=None), timeout=60).json()
    assert "prompt_logprobs" not in r["choices"][0]
    for extra in ({"stream": True}, {"prompt_logprobs": 21}, {"prompt_logprobs": -1}, {"prompt_logprobs": True}):
        e = httpx.post(url + "/v1/completions", json=dict(body, **extra), timeout=60)
        assert e.status_code == 400 and e.json()["error"]["param"] == "prompt_logprobs", (extra, e.text)
    s = httpx.post(url + "/v1/completions", json=dict(body, prompt_logprobs=0, stream=True), timeout=60)
    assert s.status_code == 200 and "prompt_logprobs" not in s.text  # 0 with stream asks for nothing there
    assert_no_leaks(engine)


def _metaspace_tokenizer():
    """A 64-token SentencePiece-style (Metaspace) fast tokenizer with one merge, "▁h": its decode of
    a lone "▁h" drops the space, as Llama-2's does."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, "▁": 3}
    vocab.update({c: i + 4 for i, c in enumerate(string.ascii_lowercase + string.ascii_uppercase + "0123456")})
    vocab["▁h"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "h")], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")
    assert len(tok) == 64 and tok.decode([vocab["▁h"]]) == "h"
    return tok


def test_http_sentencepiece_token_texts_keep_their_leading_space():
    tok = _metaspace_tokenizer()
    engine = tiny_engine(None, tokenizer=tok, max_num_seqs=2)
    with TestClient(create_app(engine, "tiny")) as c:
        body = {"model": "tiny", "prompt": "ab hello", "max_tokens": 12, "temperature": 0, "logprobs": 0,
                "prompt_logprobs": 0, "logit_bias": {"63": 5}}  # "▁h" likely among the outputs too
        r = c.post("/v1/completions", json=body).json()["choices"][0]
    # vLLM's decoded tokens for this prompt (its convert_ids_list_to_tokens): " h" keeps its space
    assert [None if e is None else next(iter(e.values()))["decoded_token"] for e in r["prompt_logprobs"]] == \
        [None, "a", "b", " h", "e", "l", "l", "o"]
    assert " h" in r["logprobs"]["tokens"] and "".join(r["logprobs"]["tokens"]) == r["text"]
    assert_no_leaks(engine)


def _byte_fallback_tokenizer():
    """A SentencePiece-style fast tokenizer with byte fallback, as Llama-2's is (ids 0 <unk>, 1 <s>,
    2 </s>, then the 256 byte pieces "<0x00>".."<0xFF>", then a few "▁" pieces; Llama-2's normalizer
    and decoder: Replace("▁", " "), ByteFallback, Fuse, Strip one leading space): a character
    outside the vocabulary is its UTF-8 bytes, one piece each; a one-line chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from .char_tokenizer import TEMPLATE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "a", "h", "i", "s", "▁h", "▁i", "▁hi", "▁is"]:
        vocab[piece] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i"), ("▁", "i"), ("▁i", "s")],
                              unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    return tok


def test_http_chat_logprob_bytes_of_sentencepiece_byte_fallback_tokens_add_up_to_the_text(monkeypatch):
    """OpenAI's ``bytes`` where a SentencePiece tokenizer spells a character in byte-fallback pieces
    ("日" is "<0xE6>" "<0x97>" "<0xA5>"): each such token's bytes are its piece's byte, not the UTF-8
    of the "\ufffd" its text reads as alone, so a reply's tokens' bytes, joined, are its text's;
    streamed as not. The piece "<0x20>" reads " " (Llama-2's decoder strips it, alone, to ""). The
    reply is scripted (the engine's sampling replaced)."""
    from fastadapters.serving import engine as engine_mod
    from fastadapters.serving.engine import Engine
    from .helpers import tiny_llama

    tok = _byte_fallback_tokenizer()
    # "日", "😀" and "!" are their bytes' pieces as the tokenizer spells them; a space may be "<0x20>" too
    pieces = ["▁", "<0xE6>", "<0x97>", "<0xA5>", "▁is", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0x20>",
              "<0x21>", "▁hi"]
    ids = tok.convert_tokens_to_ids(pieces)
    reply = tok.decode(ids)
    assert reply == "日 is 😀 ! hi" and tok.convert_ids_to_tokens(tok.encode("日 is 😀!", add_special_tokens=False)) \
        == [p for p in pieces[:-1] if p != "<0x20>"]
    engine = Engine(tiny_llama(vocab=len(tok)), tok, max_num_seqs=2, backend="torch")
    real, queue = engine_mod.sample_rows, []

    def scripted(logits, params, generators):
        tokens, errors = real(logits, params, generators)
        return [queue.pop(0) if queue else tok.eos_token_id for _ in tokens], errors

    monkeypatch.setattr(engine_mod, "sample_rows", scripted)

    # max_tokens: the reply's tokens alone (an EOS's entry, "</s>" as vLLM gives it, is no part of the text)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": len(ids),
            "logprobs": True, "top_logprobs": 20}
    with TestClient(create_app(engine, "tiny")) as c:
        queue[:] = ids
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        queue[:] = ids
        s = c.post("/v1/chat/completions", json=dict(body, stream=True))
        assert s.status_code == 200, s.text
        chunks = [json.loads(line[len("data: "):]) for line in s.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    text, content = choice["message"]["content"], choice["logprobs"]["content"]
    # the reply reads on from the prompt: its first "▁" is a space
    assert (text, choice["finish_reason"]) == (" " + reply, "length")
    assert len(content) == len(ids)
    # a token holding part of a character reads "\ufffd" and has its piece's byte; an ASCII byte piece its character
    assert [e["token"] for e in content] == [" ", "\ufffd", "\ufffd", "\ufffd", " is", " ", "\ufffd", "\ufffd",
                                             "\ufffd", "\ufffd", " ", "!", " hi"]
    assert [e["bytes"] for e in content[1:4]] == [[0xE6], [0x97], [0xA5]]
    assert bytes(b for e in content for b in e["bytes"]) == text.encode("utf-8")
    # the top tokens: those reading "\ufffd" are byte pieces "<0x80>".."<0xFF>", each its own byte; others their text's
    assert sum(t["token"] == "\ufffd" for e in content for t in e["top_logprobs"]) > 20  # (128 of the 268 tokens)
    for e in content:
        assert len(e["top_logprobs"]) == 20
        partial = [t["bytes"] for t in e["top_logprobs"] if t["token"] == "\ufffd"]
        assert all(len(b) == 1 and b[0] >= 0x80 for b in partial) and len({b[0] for b in partial}) == len(partial)
        assert all(t["bytes"] == list(t["token"].encode("utf-8")) for t in e["top_logprobs"] if t["token"] != "\ufffd")
    streamed = [e for ch in chunks for cc in ch["choices"] if cc.get("logprobs") for e in cc["logprobs"]["content"]]
    assert "".join(cc["delta"].get("content") or "" for ch in chunks for cc in ch["choices"]) == text
    assert streamed == content
    assert_no_leaks(engine)


def test_a_one_token_prompt_chunk_still_gets_its_log_probability(zoo):
    # a 3-token prefill takes 3 of the 4-token budget first: the scoring request's first chunk is 1 token
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4, chunk_size=4, token_budget=4, prefix_caching=False)
    ps = prompts([3, 9], seed=1)
    outs = []
    engine.submit(ps[0], SamplingParams(max_tokens=2, temperature=0))
    engine.submit(ps[1], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1), on_output=outs.append)
    engine.run_until_done()
    got = outs[0].prompt_logprobs
    assert got[0] is None and all(e is not None for e in got[1:]), [i for i, e in enumerate(got) if e is None]
    with torch.no_grad():
        ref = torch.log_softmax(_base(engine)(torch.tensor([ps[1]])).logits[0].double(), -1)
    assert max(abs(e[1] - ref[i - 1, e[0]].item()) for i, e in enumerate(got) if e is not None) < 1e-4
    assert all(e[3] is None for e in got[1:])  # no ranks asked (prompt_ranks): none computed
    assert_no_leaks(engine)


def test_token_logprobs_of_non_finite_rows_and_a_vocabulary_below_k_stay_json():
    raw = torch.tensor([[0.0, 1.0, float("inf"), 2.0, -1.0], [0.5, 0.1, 0.2, 0.3, 0.4]])
    got = token_logprobs(raw, [0, 1], [20, 20], [1, 4])
    assert json.loads(json.dumps(got, allow_nan=False))  # no NaN / inf reaches JSON
    assert got[0][0] == -9999.0 and len(got[0][1]) == 5  # all 5 tokens when k > vocabulary
    ref = torch.log_softmax(raw[1].double(), -1)
    assert abs(got[1][0] - ref[4].item()) < 1e-6
    assert [i for i, _ in got[1][1]] == ref.argsort(descending=True).tolist()
    ranked = token_logprobs(raw, [0, 1], [1, 0], [1, 4], ranks=True)
    # row 0: inf logits give NaN log-probabilities, which rank last; row 1: token 4 is the second most likely
    assert ranked[0][2] == 5 and ranked[1][2] == 2 and ranked[1][1] == [] and ranked[0][:2] == (-9999.0, [(2, -9999.0)])
    assert json.loads(json.dumps(ranked, allow_nan=False))


def test_min_tokens_holds_back_stop_strings_too(zoo):
    engine = tiny_engine(zoo, tokenizer=char_tokenizer(), max_num_seqs=4, block_size=4)
    tok, m, found = engine.tokenizer, 4, 0
    for seed in range(20):
        ids = prompts([7], seed=seed)[0]
        g = greedy_ref(engine, None, ids, 16)
        chars = [tok.decode([t]) for t in g]
        # a character that occurs before min_tokens and again after it
        stop = next((c for c in chars[:m - 1] if c in chars[m - 1:] and len(c.strip()) == 1), None)
        if stop is None:
            continue
        found += 1
        k = chars.index(stop, m - 1)  # the first occurrence that may end the request
        r = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, stop=[stop], min_tokens=m))[0]
        assert r.finish_reason == "stop" and len(r.output_ids) >= m, (seed, stop, chars)
        assert r.output_ids == g[:k + 1] and r.text == tok.decode(g[:k], skip_special_tokens=True), \
            (seed, stop, chars, r.text)
        r = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0, stop=[stop]))[0]
        assert len(r.output_ids) < m  # without min_tokens the earlier occurrence ends it
    assert found >= 2
    assert_no_leaks(engine)


def test_processors_and_logprobs_survive_preemption(zoo):
    # few blocks: requests are preempted and recomputed; a penalised, scoring request keeps its numbers
    engine = tiny_engine(zoo, max_num_seqs=6, block_size=4, num_blocks=8, max_model_len=32)
    ps = prompts([9, 5, 13, 7, 3, 6], seed=41)
    special = SamplingParams(max_tokens=7, temperature=0, frequency_penalty=1.0, presence_penalty=0.5, logprobs=1,
                             prompt_logprobs=1)
    names = [None, "lora_r4", "parallel", None, "houlsby", None]
    outs = []
    reqs = [engine.submit(p, special if i == 3 else SamplingParams(max_tokens=7, temperature=0), adapter=a,
                          on_output=outs.append if i == 3 else None) for i, (p, a) in enumerate(zip(ps, names))]
    engine.run_until_done()
    mine = reqs[3]
    assert mine.preemptions > 0  # it was recomputed, prompt and output
    assert mine.output_ids == _penalized_ref(_base(engine), ps[3], 7, 0.5, 1.0)
    entries = [e for o in outs for e in o.logprobs]
    assert [e[0] for e in entries] == mine.output_ids  # one entry per token, none twice after a recompute
    got = outs[0].prompt_logprobs
    with torch.no_grad():
        ref = torch.log_softmax(_base(engine)(torch.tensor([ps[3]])).logits[0].double(), -1)
    assert got[0] is None and all(abs(got[i][1] - ref[i - 1, ps[3][i]].item()) < 1e-4 for i in range(1, 7))
    for i, (r, p, a) in enumerate(zip(reqs, ps, names)):
        if i != 3:
            assert r.output_ids == greedy_ref(engine, a, p, 7), a
    assert_no_leaks(engine)


def test_http_a_batch_of_prompts_gives_n_choices_each_in_openai_order(served):
    engine, app, url = served
    batch = ["the cat", "a dog ran", "xyz"]
    body = {"model": "tiny", "prompt": batch, "max_tokens": 4, "temperature": 1.0, "seed": 11, "n": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    for i, p in enumerate(batch):  # prompt i's choice j: index i * n + j, as its own request of seed 11 + j
        for j in range(2):
            one = httpx.post(url + "/v1/completions", timeout=60,
                             json=dict(body, prompt=p, n=1, seed=11 + j)).json()["choices"][0]["text"]
            assert r["choices"][2 * i + j]["text"] == one, (i, j)
    ids = [engine.tokenizer(p)["input_ids"] for p in batch]
    assert r["usage"]["prompt_tokens"] == sum(map(len, ids)) and r["usage"]["completion_tokens"] == 24
    # echoed: each choice after its own prompt; streamed: every index's chunks add up to the same
    r = httpx.post(url + "/v1/completions", json=dict(body, echo=True, n=1, temperature=0), timeout=60).json()
    texts = [c["text"] for c in r["choices"]]
    assert texts[0].startswith("the cat") and texts[1].startswith("a dog ran")
    assert texts[2].startswith("xyz")
    s = httpx.post(url + "/v1/completions", json=dict(body, echo=True, n=1, temperature=0, stream=True), timeout=60)
    chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)] == texts
    # a batch of token-id prompts, echoed as their decoding
    r = httpx.post(url + "/v1/completions", json=dict(body, prompt=[[5, 9, 12], [7, 8]], echo=True, n=1), timeout=60)
    got = [c["text"] for c in r.json()["choices"]]
    assert got[0].startswith(engine.tokenizer.decode([5, 9, 12])) and got[1].startswith(engine.tokenizer.decode([7, 8]))
    assert r.json()["usage"]["prompt_tokens"] == 5
    # too many at once: a 400 naming the prompt batch before anything runs
    r = httpx.post(url + "/v1/completions", json=dict(body, prompt=["x"] * 9), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "--max-waiting" in r.text
    assert_no_leaks(engine)


def test_http_top_logprobs_of_tokens_sharing_a_text_keep_the_larger(zoo):
    """Byte-level BPE tokens can decode alone to the same text ("\ufffd"): the completions dict keyed by
    text keeps the larger log-probability of those tokens, so a sampled token never looks like the
    most likely one by overwriting it."""
    tok = char_tokenizer()
    decode = tok.decode
    tok.decode = lambda ids, *a, **k: "\ufffd" if isinstance(ids, list) and len(ids) == 1 and ids[0] % 2 \
        else decode(ids, *a, **k)  # odd ids: one shared text
    engine = tiny_engine(zoo, tokenizer=tok, max_num_seqs=2)
    seen = []  # the engine's own entries, (id, log-prob, top k), beside what the server sends
    submit = engine.submit

    def spying(*a, on_output=None, **k):
        return submit(*a, on_output=lambda o: (seen.extend(o.logprobs or ()), on_output(o)), **k)

    engine.submit = spying
    with live_server(create_app(engine, "tiny")) as url:
        r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "abc", "max_tokens": 30,
                                                                  "temperature": 1.5, "seed": 3, "logprobs": 5})
        lp = r.json()["choices"][0]["logprobs"]
    assert len(seen) == len(lp["top_logprobs"]) == 30
    shared = 0
    for (i, value, top), sent in zip(seen, lp["top_logprobs"]):
        want = {}
        for j, v in [*top, (i, value)]:
            t = tok.decode([j], skip_special_tokens=False)
            want[t] = max(want.get(t, v), v)
        assert sent == pytest.approx(want)
        shared += i % 2 == 1 and any(j % 2 and j != i for j, _ in top)
    assert shared  # some sampled token shared its text with another of the top 5
    assert_no_leaks(engine)


def test_allowed_token_ids_restrict_greedy_and_sampled_choices(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4)
    ps = prompts([6, 8], seed=51)
    allowed = [7, 19, 33, 60]
    greedy, sampled, other = engine.generate(
        ps + [ps[1]], [SamplingParams(max_tokens=N, temperature=0, allowed_token_ids=allowed),
                       SamplingParams(max_tokens=N, temperature=1.5, seed=2, allowed_token_ids=allowed[:2]),
                       SamplingParams(max_tokens=N, temperature=0)], [None, "lora_r4", "lora_r4"])
    out = []
    with torch.no_grad():  # the reference: greedy over the allowed tokens' logits of the model alone
        for _ in range(N):
            logits = _base(engine)(torch.tensor([ps[0] + out])).logits[0, -1]
            out.append(allowed[int(logits[allowed].argmax())])
    assert greedy.output_ids == out
    assert set(sampled.output_ids) <= set(allowed[:2])
    assert other.output_ids == greedy_ref(engine, "lora_r4", ps[1], N)  # its batch neighbour is untouched
    with pytest.raises(ValueError, match="^allowed_token_ids: got"):
        engine.submit([5], SamplingParams(allowed_token_ids=[]))
    with pytest.raises(ValueError, match="^allowed_token_ids: got"):
        engine.submit([5], SamplingParams(allowed_token_ids=[64]))
    assert_no_leaks(engine)


def test_the_http_layer_and_the_engine_agree_on_the_top_logprobs_limit():
    from fastadapters.serving import protocol

    assert protocol.MAX_TOP_LOGPROBS == SamplingParams.MAX_LOGPROBS
