"""Structured output (serving/structured.py): a request's tokens constrained to a regular expression,
a list of choices, an EBNF grammar or a JSON schema, through xgrammar.

The engine's greedy tokens are compared with a reference written without it: the tiny llama run
alone on the whole sequence (with the request's adapter active), masked by xgrammar's own
``apply_token_bitmask_inplace`` from a matcher compiled here, argmax. Structured requests share
batches with free ones (base, LoRA, series, parallel, prefix) whose tokens must equal their runs
alone, and survive preemption. The masks themselves equal xgrammar's at an odd vocabulary size.
Errors name the field and leave the engine as it was; over HTTP the OpenAI and vLLM request forms
reach the engine and bad ones are 400s naming the field. JSON schemas need a tokenizer with braces
and quotes: those run on SmolLM2 in test_openai_real.py. Skipped without xgrammar.
"""
from __future__ import annotations

import json
import re
import sys

import httpx
import pytest
import torch

import fastadapters as fa
from fastadapters.serving.api import create_app
from fastadapters.serving.engine import PromptError
from fastadapters.serving.protocol import ChatRequest, CompletionRequest
from fastadapters.serving.sampling import SamplingParams
from fastadapters.serving.structured import CACHE_SIZE, Grammars, StructuredSpec, StructuredUnavailable, mask_rows
from .char_tokenizer import char_tokenizer
from .live_server import live_server
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)

xgr = pytest.importorskip("xgrammar")

EOS = 0  # the test tokenizer's EOS: "<pad>"
REGEX = StructuredSpec("regex", "[a-c]{3}x", source="guided_regex")
# a structural tag (xgrammar's format, as vLLM takes it): the output is "ab", two of c-d, "Z" (one tag, then it ends)
TAG = {"type": "structural_tag", "format": {
    "type": "triggered_tags", "triggers": ["ab"], "at_least_one": True, "stop_after_first": True,
    "tags": [{"type": "tag", "begin": "ab", "content": {"type": "regex", "pattern": "[c-d]{2}"}, "end": "Z"}]}}
STAG = StructuredSpec("structural_tag", json.dumps(TAG), source="response_format")
CHOICE = StructuredSpec("choice", choices=("Hello world", "Bye"), source="guided_choice")
GRAMMAR = StructuredSpec("grammar", 'root ::= ("ab" | "c")+ "Z"', source="guided_grammar")
LARK = StructuredSpec("grammar", '// Lark: no "::="\n?start: item+ "Z"\nitem: "ab" | /[c-d]/', source="guided_grammar")


def eos_tokenizer():
    tok = char_tokenizer()
    tok.eos_token = "<pad>"  # a grammar ends on the EOS
    return tok


def _ref_compiled(tok, vocab, spec: StructuredSpec):
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[EOS])
    compiler = xgr.GrammarCompiler(info)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.value)
    if spec.kind == "choice":
        return compiler.compile_grammar("root ::= " + " | ".join(f'"{c}"' for c in spec.choices))
    if spec.kind == "structural_tag":
        return compiler.compile_structural_tag(spec.value)
    if spec is LARK:
        return compiler.compile_lark(spec.value)
    return compiler.compile_grammar(spec.value)


@torch.no_grad()
def masked_greedy_ref(engine, adapter, ids, spec, n):
    """The request alone: the whole sequence through the model each step, xgrammar's own mask, argmax."""
    model = engine.model
    entry = None if adapter is None else engine.registry.entries[adapter]
    fa.set_adapter(model, None if entry is None else entry.internal)
    matcher = xgr.GrammarMatcher(_ref_compiled(engine.tokenizer, engine.vocab_size, spec))
    bitmask = xgr.allocate_token_bitmask(1, engine.vocab_size)
    seq, out = list(ids), []
    try:
        while len(out) < n:
            logits = model(torch.tensor([seq])).logits[:, -1].float().clone()
            matcher.fill_next_token_bitmask(bitmask, 0)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax())
            assert matcher.accept_token(token)
            out.append(token)
            seq.append(token)
            if matcher.is_terminated():
                break
    finally:
        fa.set_adapter(model, None)
    return out


def test_greedy_equals_a_masked_reference_beside_free_requests(zoo):
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=9)
    ps = prompts([5, 9, 3, 7, 6, 4, 8, 5, 6], seed=11)
    asks = [(REGEX, None), (CHOICE, "lora_r4"), (GRAMMAR, "houlsby"), (REGEX, "parallel"),
            (None, None), (None, "parallel"), (None, "prefix"), (STAG, "pfeiffer"), (LARK, "lora_r64")]
    params = [SamplingParams(max_tokens=12, temperature=0, structured=s, ignore_eos=s is None) for s, _ in asks]
    reqs = [engine.submit(p, sp, adapter=a) for p, sp, (_, a) in zip(ps, params, asks)]
    engine.run_until_done()
    for (spec, adapter), p, r in zip(asks, ps, reqs):
        if spec is None:  # free neighbours: their runs alone
            assert r.output_ids == greedy_ref(engine, adapter, p, 12), adapter
            continue
        want = masked_greedy_ref(engine, adapter, p, spec, 12)
        assert r.output_ids == want, (spec.kind, adapter)
        if want[-1] == EOS:  # the grammar completed: "stop", the EOS's text left out
            assert r.finish_reason == "stop" and r.text == engine.tokenizer.decode(want[:-1])
        else:
            assert r.finish_reason == "length"
    done = [r for (s, _), r in zip(asks, reqs) if s is REGEX]
    assert all(r.finish_reason == "stop" and re.fullmatch(REGEX.value, r.text) for r in done), [r.text for r in done]
    assert reqs[1].finish_reason == "stop" and reqs[1].text in CHOICE.choices
    assert reqs[7].finish_reason == "stop" and re.fullmatch("ab[cd]{2}Z", reqs[7].text), reqs[7].text
    assert reqs[8].finish_reason != "stop" or re.fullmatch("(ab|[cd])+Z", reqs[8].text), reqs[8].text
    assert_no_leaks(engine)


def test_a_completed_grammar_ends_the_request_even_with_ignore_eos(zoo):
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=4)
    p = prompts([6], seed=8)[0]
    r = engine.generate([p], SamplingParams(max_tokens=12, temperature=0, structured=CHOICE, ignore_eos=True))[0]
    assert r.output_ids == masked_greedy_ref(engine, None, p, CHOICE, 12) and r.output_ids[-1] == EOS
    assert r.finish_reason == "stop" and r.text in CHOICE.choices  # the EOS's text left out
    assert_no_leaks(engine)


def test_sampled_outputs_match_and_a_seed_reproduces_in_another_batch(zoo):
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=8)
    spec = StructuredSpec("regex", "[a-c]{2,4}(x|yy)[0-7]?")
    ps = prompts([4, 6, 5, 7, 3, 8], seed=5)
    params = [SamplingParams(max_tokens=10, temperature=1.5, seed=s, structured=spec) for s in range(6)]
    together = engine.generate(ps, params, adapters=["lora_r64", None, "pfeiffer", None, "prefix", None])
    for r in together:
        assert r.finish_reason == "stop" and re.fullmatch(spec.value, r.text), r.text
    assert len({r.text for r in together}) > 1  # sampled, not all the greedy answer
    alone = engine.generate([ps[2]], params[2], adapters=["pfeiffer"])[0]
    assert alone.output_ids == together[2].output_ids
    assert_no_leaks(engine)


def test_a_preempted_structured_request_keeps_its_grammar(zoo):
    # few blocks: requests are preempted and recomputed; each matcher keeps the tokens it accepted
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=6, block_size=4, num_blocks=8,
                         max_model_len=32)
    spec = StructuredSpec("regex", "[a-h]{10}Q")
    ps = prompts([9, 5, 13, 7, 3, 6], seed=41)
    names = [None, "lora_r4", "parallel", None, "houlsby", None]
    sp = SamplingParams(max_tokens=12, temperature=0, structured=spec)
    reqs = [engine.submit(p, sp, adapter=a) for p, a in zip(ps, names)]
    engine.run_until_done()
    assert sum(r.preemptions for r in reqs) > 0
    for r, p, a in zip(reqs, ps, names):
        assert r.output_ids == masked_greedy_ref(engine, a, p, spec, 12), a
        assert r.finish_reason == "stop" and re.fullmatch(spec.value, r.text), r.text
    assert_no_leaks(engine)


def test_mask_rows_equals_xgrammar_at_an_odd_vocabulary():
    vocab = 77  # the tokenizer's 64 plus padding ids no grammar allows; not a multiple of 32
    grammars = Grammars(eos_tokenizer(), vocab, [EOS])
    matchers = [grammars.matcher(s) for s in (REGEX, CHOICE, GRAMMAR)]
    assert matchers[1].accept_token(31)  # "B": one choice left
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    rows = [0, 2, 4]
    before = logits.clone()
    got = mask_rows(logits, rows, matchers, aliased=True)
    assert torch.equal(logits, before)  # aliased: the caller's tensor is left as it was
    want = before.clone()
    for row, m in zip(rows, matchers):
        bm = xgr.allocate_token_bitmask(1, vocab)
        m.fill_next_token_bitmask(bm, 0)
        one = want[row:row + 1].clone()
        xgr.apply_token_bitmask_inplace(one, bm)
        want[row] = one[0]
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3]], before[[1, 3]])  # rows without a matcher untouched
    assert torch.isinf(got[2]).sum() == vocab - 1  # after "B" only "y"
    assert (got[rows][:, 64:] == float("-inf")).all()  # padding ids are never allowed
    same = mask_rows(logits, rows, matchers, aliased=False)  # not aliased: masked in place
    assert same is logits and torch.equal(logits, want)


def test_errors_name_the_field_and_change_nothing(zoo, monkeypatch):
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=4)
    p = prompts([5], seed=3)[0]
    with pytest.raises(ValueError) as e:
        engine.submit(p, SamplingParams(structured=StructuredSpec("regex", "(", source="guided_regex")))
    assert ".cc:" not in str(e.value) and not str(e.value).split(": ", 2)[-1].startswith("[")  # xgrammar's noise
    for spec, words in ((StructuredSpec("regex", "(", source="guided_regex"), "guided_regex: cannot be compiled"),
                        (StructuredSpec("grammar", "root ::= root", source="guided_grammar"),  # compiles; no output
                         "guided_grammar: the grammar allows no output"),
                        (StructuredSpec("regex", "[{}]+", source="guided_regex"),  # this vocabulary has no braces
                         "guided_regex: the grammar allows no output"),
                        (StructuredSpec("grammar", "hello", source="guided_grammar"),  # read as Lark: no rule
                         "guided_grammar: cannot be compiled"),
                        (StructuredSpec("grammar", 'start ::= "a"', source="guided_grammar"),
                         "guided_grammar: cannot be compiled"),
                        (StructuredSpec("choice", choices=(), source="guided_choice"), "guided_choice")):
        with pytest.raises(ValueError, match=re.escape(words)):
            engine.submit(p, SamplingParams(max_tokens=4, temperature=0, structured=spec))
    with pytest.raises(ValueError, match="min_tokens"):
        engine.submit(p, SamplingParams(max_tokens=4, min_tokens=2, temperature=0, structured=REGEX))
    assert not engine.requests and not engine._inbox
    with pytest.raises(PromptError, match="end-of-sequence"):  # a grammar ends on an EOS; none here
        tiny_engine(tokenizer=char_tokenizer()).submit(p, SamplingParams(structured=REGEX))
    with pytest.raises(PromptError, match="tokenizer"):
        tiny_engine().submit(p, SamplingParams(structured=REGEX))
    # a request whose allowed_token_ids leave the grammar nothing ends alone, with an error that says so
    bad = engine.submit(p, SamplingParams(max_tokens=4, temperature=0, structured=REGEX, allowed_token_ids=[40]))
    other = engine.submit(p, SamplingParams(max_tokens=4, temperature=0), adapter="lora_r4")
    engine.run_until_done()
    assert bad.finish_reason == "error" and other.output_ids == greedy_ref(engine, "lora_r4", p, 4)
    assert_no_leaks(engine)
    # without xgrammar (or with a release not tested) the error says what to install
    from fastadapters.serving import structured

    monkeypatch.setattr(structured, "_checked", None)  # (the module and its version are checked once)
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(StructuredUnavailable, match=re.escape('pip install "fastadapters[structured]"')):
        Grammars(eos_tokenizer(), 64, [EOS]).compile(REGEX)
    monkeypatch.undo()
    import importlib.metadata

    monkeypatch.setattr(structured, "_checked", None)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.20")
    with pytest.raises(StructuredUnavailable, match=r"xgrammar 0\.1\.20 is installed"):
        Grammars(eos_tokenizer(), 64, [EOS]).compile(REGEX)


def test_a_grammar_compiles_once_and_the_cache_is_bounded(zoo):
    engine = tiny_engine(tokenizer=eos_tokenizer(), max_num_seqs=4)
    ps = prompts([3, 4, 5, 6, 7], seed=2)
    engine.generate(ps, SamplingParams(max_tokens=6, temperature=0, structured=REGEX))
    grammars = engine._grammars
    assert grammars.compiles == 1
    for i in range(CACHE_SIZE + 3):
        grammars.compile(StructuredSpec("choice", choices=("a" + chr(97 + i // 26) + chr(97 + i % 26), "b")))
    assert len(grammars._cache) == CACHE_SIZE and grammars.compiles == CACHE_SIZE + 4
    assert REGEX not in grammars._cache  # the least recently used went first


def test_request_forms_map_to_one_constraint():
    def one(**kw):
        return CompletionRequest(model="m", prompt="p", **kw).structured()

    s = one(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert (s.source, s.kind, json.loads(s.value)) == ("response_format", "json", {"type": "object"})
    assert one(response_format={"type": "json_object"}).kind == "json_object"
    assert one(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).kind == "json_object"
    assert one(response_format={"type": "text"}) is None and one() is None
    assert json.loads(one(guided_json='{"type": "integer"}').value) == {"type": "integer"}
    assert (one(guided_regex="a+").kind, one(guided_grammar='root ::= "a"').kind) == ("regex", "grammar")
    assert one(guided_choice=["x", "y"]).choices == ("x", "y")
    s = one(structured_outputs={"json": {"type": "object"}, "disable_any_whitespace": True, "backend": "xgrammar"})
    assert (s.source, s.kind, s.any_whitespace) == ("structured_outputs.json", "json", False)
    assert one(structured_outputs={"choice": ["a"]}).choices == ("a",)
    assert one(structured_outputs={"json_object": True}).kind == "json_object"
    wide = {"type": "object", "description": "\u5929" * 20000}  # 20k characters sent: within the 32k limit
    StructuredSpec("json", one(guided_json=wide).value).validate()
    assert one(structured_outputs={"regex": "a", "disable_additional_properties": True}).kind == "regex"
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], guided_regex="[0-7]+")
    assert chat.structured().kind == "regex"
    # structural tags, vLLM's way: the response_format object itself is the tag's JSON; in
    # structured_outputs, its JSON text
    s = one(response_format=TAG)
    assert (s.source, s.kind, json.loads(s.value)) == ("response_format", "structural_tag", TAG)
    legacy = {"type": "structural_tag", "structures": [{"begin": "ab", "schema": {"type": "integer"}, "end": "Z"}],
              "triggers": ["ab"]}
    assert json.loads(one(response_format=legacy).value) == legacy
    s = one(structured_outputs={"structural_tag": json.dumps(TAG)})
    assert (s.source, s.kind, json.loads(s.value)) == ("structured_outputs.structural_tag", "structural_tag", TAG)
    for kw, field in ((dict(response_format={"type": "json_schema"}), "response_format"),
                      (dict(response_format={"type": "grammar"}), "response_format"),
                      (dict(guided_json="{not json"), "guided_json"), (dict(guided_json="[1]"), "guided_json"),
                      (dict(guided_regex="a", guided_choice=["b"]), "guided_regex"),
                      (dict(structured_outputs={"whitespace_pattern": " "}), "structured_outputs"),
                      (dict(structured_outputs={"json_object": 1}), "structured_outputs.json_object"),
                      (dict(structured_outputs={"regex": 5}), "structured_outputs.regex"),
                      (dict(guided_json="[" * 3000 + "]" * 3000), "guided_json"),  # nested too deeply: not a 500
                      (dict(response_format={"type": "json_object", "schema": {"type": "object"}}), "response_format"),
                      (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "shema": {}}}),
                       "response_format"),
                      (dict(response_format=dict(TAG, triggers=["ab"])), "response_format"),  # two forms at once
                      (dict(structured_outputs={"structural_tag": TAG}), "structured_outputs.structural_tag")):
        with pytest.raises(ValueError) as e:
            one(**kw)
        assert str(e.value).split(":")[0] == field, (kw, str(e.value))


@pytest.fixture(scope="module")
def served(zoo):
    torch.set_num_threads(1)
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=4)
    with live_server(create_app(engine, "tiny")) as url:
        yield engine, url


def _post(url, path="/v1/completions", **body):
    base = {"model": "tiny", "max_tokens": 12, "temperature": 0}
    base.update({"prompt": "abc"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    return httpx.post(url + path, json={**base, **body}, timeout=60)


def _stream_text(url, path, **body):
    with httpx.stream("POST", url + path, json={"model": "tiny", "max_tokens": 12, "temperature": 0, "stream": True,
                                               **body}, timeout=60) as r:
        assert r.status_code == 200
        text, reason = "", None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])["choices"][0]
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            reason = c.get("finish_reason") or reason
        return text, reason


def test_http_constraints_reach_the_engine_streamed_or_not(served):
    engine, url = served
    r = _post(url, guided_regex="[a-c]{3}x")
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert re.fullmatch("[a-c]{3}x", c["text"]) and c["finish_reason"] == "stop"
    assert _stream_text(url, "/v1/completions", prompt="abc", guided_regex="[a-c]{3}x") == (c["text"], "stop")
    msgs = [{"role": "user", "content": "hi"}]
    r = _post(url, "/v1/chat/completions", structured_outputs={"choice": ["Hello world", "Bye"]})
    assert r.status_code == 200, r.text
    m = r.json()["choices"][0]
    assert m["message"]["content"] in ("Hello world", "Bye") and m["finish_reason"] == "stop"
    assert _stream_text(url, "/v1/chat/completions", messages=msgs,
                        structured_outputs={"choice": ["Hello world", "Bye"]}) == (m["message"]["content"], "stop")
    r = _post(url, guided_grammar='start: ("ab" | "c")+ "Z"')  # Lark's notation, as vLLM takes it
    assert r.status_code == 200 and re.fullmatch("(ab|c)+Z|(ab|c)*", r.json()["choices"][0]["text"]), r.text
    r = _post(url, "/v1/chat/completions", response_format=TAG)  # a structural tag, as vLLM takes it
    assert r.status_code == 200, r.text
    assert re.fullmatch("ab[cd]{2}Z", r.json()["choices"][0]["message"]["content"]), r.text
    r = _post(url, guided_grammar='root ::= ("c" | "d")+ "Z"', n=3, temperature=1.5, seed=4, max_tokens=24)
    assert r.status_code == 200, r.text  # n choices, each its own matcher (a shared one would break the grammar)
    got = r.json()["choices"]
    assert all(re.fullmatch("[cd]+Z" if c["finish_reason"] == "stop" else "[cd]*", c["text"]) for c in got), got
    assert len({c["text"] for c in got}) > 1
    assert_no_leaks(engine)


def test_http_bad_constraints_are_400s_naming_the_field(served):
    engine, url = served
    compiled = engine._grammars.compiles if engine._grammars else 0
    for body, field in ((dict(guided_regex="("), "guided_regex"),
                        (dict(guided_grammar="root ::= "), "guided_grammar"),
                        (dict(guided_regex="a", guided_choice=["b"]), "guided_regex"),
                        (dict(response_format={"type": "xml"}), "response_format"),
                        (dict(structured_outputs={"regex": "a", "structural_tag": {}}),  # (its JSON text is valid)
                         "structured_outputs.structural_tag"),
                        (dict(structured_outputs={"regex": "a", "whitespace_pattern": " "}), "structured_outputs"),
                        (dict(response_format={"type": "structural_tag", "format": {"type": "nope"}}),
                         "response_format"),
                        (dict(response_format={"type": "structural_tag", "structures": [{"begin": "a"}],
                                               "triggers": ["a"]}), "response_format"),
                        (dict(guided_choice=[]), "guided_choice"),
                        (dict(guided_regex="a+", min_tokens=2), "min_tokens"),
                        (dict(guided_regex="x" * 40000), "guided_regex")):
        r = _post(url, **body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == field, (body, err)
    assert (engine._grammars.compiles if engine._grammars else 0) == compiled  # nothing bad was kept
    # what the grammar allows, bad_words forbids: the client's error (a 400), found while generating
    r = _post(url, structured_outputs={"choice": ["Bye"]}, bad_words=["Bye"])
    assert r.status_code == 400 and "every logit is -inf" in r.json()["error"]["message"], r.text
    assert _post(url, guided_regex="[a-c]{3}x").status_code == 200  # and it serves on
    assert_no_leaks(engine)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now"}}


def test_tool_choice_maps_to_a_constraint_on_the_call():
    def chat(**kw):
        return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)

    named = chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_call() == ("named", "get_weather")
    s = named.structured()
    assert (s.source, s.kind, json.loads(s.value)) == ("tool_choice", "json", WEATHER["function"]["parameters"])
    s = chat(tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "now"}}).structured()
    assert json.loads(s.value) == {"type": "object", "properties": {}}  # no parameters: an empty object
    req = chat(tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(req.structured().value)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [it["properties"]["name"]["enum"] for it in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["now"]]
    assert "maxItems" not in json.loads(chat(tools=[WEATHER], tool_choice="required").structured().value)
    assert chat(tools=[WEATHER], tool_choice="none").structured() is None and chat().structured() is None
    assert chat(tools=[WEATHER], tool_choice="none").template_options()["tools"] == [WEATHER]
    # draft-7 "definitions" and 2020-12 "$defs" move to the top, where the references point
    item = {"type": "object", "properties": {"n": {"type": "integer"}}}
    d7 = {"type": "function", "function": {"name": "d7", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/definitions/Item"}}, "definitions": {"Item": item}}}}
    d20 = {"type": "function", "function": {"name": "d20", "parameters": {
        "type": "object", "properties": {"y": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": item}}}}
    schema = json.loads(chat(tools=[d7, d20], tool_choice="required").structured().value)
    assert schema["definitions"] == {"Item": item} and schema["$defs"] == {"Item": item}
    xgr.Grammar.from_json_schema(json.dumps(schema))  # the references resolve (else it raises)
    for kw, field in ((dict(tools=[WEATHER]), "tool_choice"),  # "auto", the default: no parser here
                      (dict(tools=[WEATHER], tool_choice="auto"), "tool_choice"),
                      (dict(tool_choice="required"), "tool_choice"),
                      (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}),
                       "tool_choice"),
                      (dict(tools=[{"type": "code"}], tool_choice="required"), "tools[0]"),
                      (dict(tools=[WEATHER, WEATHER], tool_choice="required"), "tools[1]"),
                      (dict(tools=[{"type": "function", "function": {"name": "a b"}}], tool_choice="required"),
                       "tools[0]"),
                      (dict(tools=[WEATHER], tool_choice="required", guided_regex="a"), "guided_regex"),
                      (dict(tools=[WEATHER], tool_choice="required", stop=["}"]), "stop"),  # would cut the JSON
                      (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                            stop_token_ids=[5]), "stop_token_ids")):
        with pytest.raises(ValueError) as e:
            chat(**kw).structured()
        assert str(e.value).split(":")[0] == field, (kw, str(e.value))


def test_a_grammar_over_its_time_budget_ends_alone(zoo):
    # a budget no matcher meets: the structured request ends with an error after three tokens in a row
    # over it; its neighbour is untouched. (The budget exists for ambiguous grammars whose matcher grows
    # costlier per token, e.g. root ::= x "b"; x ::= x x | "a" | "", seconds per token after a few hundred.)
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=4, max_grammar_ms=1e-6)
    p = prompts([6], seed=9)[0]
    a = engine.tokenizer.convert_tokens_to_ids("a")  # (favoured, so the grammar does not end at once)
    slow = engine.submit(p, SamplingParams(max_tokens=12, temperature=0, logit_bias={a: 50.0}, structured=StructuredSpec(
        "grammar", 'root ::= x "b"\nx ::= x x | "a" | ""', source="guided_grammar")))
    other = engine.submit(p, SamplingParams(max_tokens=12, temperature=0), adapter="lora_r4")
    engine.run_until_done()
    assert slow.finish_reason == "error" and len(slow.output_ids) == 2  # the third slow token ends it
    assert other.output_ids == greedy_ref(engine, "lora_r4", p, 12)
    assert engine.stats["request_errors"] == 1
    assert_no_leaks(engine)
    with pytest.raises(ValueError, match="max_grammar_ms"):
        tiny_engine(max_grammar_ms=0)


# an EBNF grammar of 400 bounded repetitions (6.7 KB, within the size limit): xgrammar 0.2.9 took
# 4.7 s to compile it against the 64-token test vocabulary on a 2-core EPYC (20 s for 200 of them
# against SmolLM2's 49k), far past the limits set below
SLOW = StructuredSpec("grammar", "root ::= " + " ".join(f'[a-z]{{0,{k}}} "x"' for k in range(1, 400)),
                      source="guided_grammar")


def test_a_grammar_that_compiles_too_long_is_refused_and_its_compiler_stopped(zoo):
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=4, max_grammar_compile_s=0.3)
    p = prompts([5], seed=3)[0]
    limit = re.escape("longer than this server allows (0.3 s, --max-grammar-compile-s)")
    with pytest.raises(ValueError, match="guided_grammar: compiling it to a grammar took " + limit):
        engine.submit(p, SamplingParams(max_tokens=4, temperature=0, structured=SLOW))
    worker = engine._grammars._worker
    assert worker.started == 1 and worker.killed == 1 and worker._proc is None  # the compile was stopped
    assert not engine.requests and not engine._inbox and engine._grammars.compiles == 0
    with pytest.raises(ValueError, match=limit):  # the same spec again: refused without compiling
        engine.submit(p, SamplingParams(max_tokens=4, temperature=0, structured=SLOW))
    assert worker.started == 1 and worker.killed == 1
    # the next grammar compiles in a new child, and constrains exactly as one compiled here
    good = engine.submit(p, SamplingParams(max_tokens=8, temperature=0, structured=REGEX), adapter="lora_r4")
    other = engine.submit(p, SamplingParams(max_tokens=8, temperature=0), adapter="houlsby")
    engine.run_until_done()
    assert worker.started == 2 and worker.killed == 1 and engine._grammars.compiles == 1
    assert good.output_ids == masked_greedy_ref(engine, "lora_r4", p, REGEX, 8) and good.finish_reason == "stop"
    assert other.output_ids == greedy_ref(engine, "houlsby", p, 8)
    assert_no_leaks(engine)
    proc = worker._proc
    engine.stop()  # (never started: stop still ends the compiler child)
    assert worker._proc is None and proc.poll() is not None
    # no limit: compiled in the calling thread, as a library user of Grammars does
    free = tiny_engine(tokenizer=eos_tokenizer(), max_grammar_compile_s=None)
    free.generate([p], SamplingParams(max_tokens=6, temperature=0, structured=REGEX))
    assert free._grammars._worker is None and free._grammars.compiles == 1
    for bad in (0, -1.0, True, "10", 1e9):
        with pytest.raises(ValueError, match="max_grammar_compile_s"):
            tiny_engine(max_grammar_compile_s=bad)


def test_http_a_slow_grammar_is_a_400_and_holds_up_no_other_request(zoo):
    import concurrent.futures
    import time

    torch.set_num_threads(1)
    engine = tiny_engine(zoo, tokenizer=eos_tokenizer(), max_num_seqs=4, max_grammar_compile_s=1.5)
    engine.compile_structured(REGEX)  # the compiler child is up (its start is not part of the limit)
    with live_server(create_app(engine, "tiny")) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        slow = pool.submit(lambda: (_post(url, guided_grammar=SLOW.value), time.monotonic()))
        time.sleep(0.2)  # the slow one is compiling
        plain = _post(url, prompt="abcab")
        cached = _post(url, guided_regex=REGEX.value)  # compiled before: it does not wait for the compiler
        plain_done = time.monotonic()
        r, slow_done = slow.result(timeout=120)
        assert plain.status_code == 200 and cached.status_code == 200, (plain.text, cached.text)
        assert re.fullmatch(REGEX.value, cached.json()["choices"][0]["text"]), cached.text
        assert plain_done < slow_done  # tokenising and serving went on while the grammar compiled
        assert r.status_code == 400 and slow_done - t0 >= 1.5, r.text
        err = r.json()["error"]
        assert err["param"] == "guided_grammar" and "--max-grammar-compile-s" in err["message"], err
        assert engine._grammars._worker.killed == 1
        r = _post(url, guided_regex="[a-c]{3}x")  # a new compiler child serves the next grammar
        assert r.status_code == 200 and re.fullmatch("[a-c]{3}x", r.json()["choices"][0]["text"]), r.text
    assert_no_leaks(engine)


def test_a_grammar_whose_compiler_process_dies_is_refused_and_the_next_compiles():
    import threading

    engine = tiny_engine(tokenizer=eos_tokenizer(), max_grammar_compile_s=60)
    engine.compile_structured(REGEX)  # the child is up
    worker = engine._grammars._worker
    threading.Timer(0.5, worker._proc.kill).start()  # it dies (as by the OOM killer) while compiling SLOW
    died = re.escape("guided_grammar: cannot be compiled to a grammar: the grammar compiler process exited while "
                     "compiling it (exit code -9)")
    with pytest.raises(ValueError, match=died):
        engine.compile_structured(SLOW)
    with pytest.raises(ValueError, match=died):  # the same spec again: refused without another child
        engine.compile_structured(SLOW)
    assert worker.started == 1 and worker._proc is None
    engine.compile_structured(CHOICE)  # the next spec: a new child
    assert worker.started == 2 and engine._grammars.compiles == 2
    engine.stop()


def test_an_idle_compiler_process_exits_and_the_next_compile_starts_another():
    """The child holds ~400 MB (xgrammar imports torch): it is stopped after idle_s without a
    compile, and never while one runs."""
    import time

    from fastadapters.serving.grammar_worker import CompileWorker

    grammars = Grammars(eos_tokenizer(), 64, [EOS], compile_timeout_s=60)
    worker = CompileWorker(grammars._get_info().serialize_json(), idle_s=1.0)
    assert worker.compile({"method": "regex", "value": "[a-c]+"}, 60) > 0
    proc = worker._proc
    time.sleep(0.5)
    assert worker.compile({"method": "regex", "value": "[a-d]+"}, 60) > 0  # a compile re-arms the timer
    time.sleep(0.7)
    assert worker._proc is proc and proc.poll() is None and worker.reaped == 0  # 0.7 s idle: kept
    deadline = time.monotonic() + 10
    while worker._proc is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker._proc is None and proc.poll() is not None and worker.reaped == 1
    assert worker.compile({"method": "regex", "value": "[a-c]+"}, 60) > 0  # a new child
    assert worker.started == 2 and worker._proc.poll() is None
    worker._lock.acquire()  # a compile "running": the timer leaves the child alone
    try:
        worker._last -= 5
        worker._reap_if_idle()
        assert worker._proc is not None and worker.reaped == 1
    finally:
        worker._lock.release()
    worker.close()
    assert worker._proc is None and worker._timer is None


def test_grammar_memory_is_bounded_per_grammar_in_the_cache_and_in_the_compiler(monkeypatch):
    from fastadapters.serving import structured

    # one compiled grammar past MAX_GRAMMAR_BYTES is refused, measured in the child or in this thread
    monkeypatch.setattr(structured, "MAX_GRAMMAR_BYTES", 1000)
    for limit in (60, None):
        engine = tiny_engine(tokenizer=eos_tokenizer(), max_grammar_compile_s=limit)
        with pytest.raises(ValueError, match=r"guided_regex: its compiled grammar takes [0-9.]+ MB, more than this "
                                             r"server keeps for one grammar \(0\.000953674 MB\)"):
            engine.compile_structured(REGEX)
        assert engine._grammars.compiles == 0 and not engine._grammars._cache
        engine.stop()
    monkeypatch.undo()
    # the cache holds at most CACHE_BYTES (least recently used dropped first)
    engine = tiny_engine(tokenizer=eos_tokenizer(), max_grammar_compile_s=None)
    grammars = engine._grammars or engine.compile_structured(REGEX) and engine._grammars
    one = grammars._cache[REGEX].memory_size_bytes
    monkeypatch.setattr(structured, "CACHE_BYTES", int(one * 1.5))
    for spec in (CHOICE, GRAMMAR):
        engine.compile_structured(spec)
    sizes = [c.memory_size_bytes for c in grammars._cache.values()]
    assert REGEX not in grammars._cache and grammars.compiles == 3
    assert sum(sizes) <= structured.CACHE_BYTES or len(sizes) == 1, sizes
    # the compiler process grows by at most COMPILE_MEMORY_BYTES: past it, xgrammar's allocation fails
    # (SLOW grew this process's data segment by ~90 MB compiling in this thread; its grammar is 45 MB).
    # xgrammar fails the allocation (bad_alloc, the child lives) or, where a compile thread hits it,
    # the child aborts: either way the spec is a 400 and the next one compiles
    monkeypatch.setattr(structured, "COMPILE_MEMORY_BYTES", 64 << 20)
    engine = tiny_engine(tokenizer=eos_tokenizer(), max_grammar_compile_s=60)
    with pytest.raises(ValueError, match=r"guided_grammar: cannot be compiled to a grammar: (compiling it needs more "
                                         r"than the 64 MB this server allows|the grammar compiler process exited)"):
        engine.compile_structured(SLOW)
    engine.compile_structured(REGEX)
    assert engine._grammars.compiles == 1 and engine._grammars._worker.killed == 0
    engine.stop()


def test_a_compiler_child_of_another_protocol_refuses_to_start(monkeypatch):
    # fastadapters upgraded on disk under a running server: the new child's frames would be misread
    from fastadapters.serving import grammar_worker

    engine = tiny_engine(tokenizer=eos_tokenizer(), max_grammar_compile_s=60)
    monkeypatch.setattr(grammar_worker, "PROTOCOL", grammar_worker.PROTOCOL + 1)  # the server's side only
    with pytest.raises(RuntimeError, match="changed on disk under the running server; restart it"):
        engine.compile_structured(REGEX)
    assert engine._grammars.compiles == 0
    monkeypatch.undo()
    engine.compile_structured(REGEX)  # a child of its own protocol starts
    assert engine._grammars.compiles == 1
    engine.stop()
