"""tool_choice "auto" (serving/tool_parsers.py): a reply of text and tool calls, in the Hermes format,
Llama 3's JSON format (``llama3_json``), Mistral's ``[TOOL_CALLS]`` array (``mistral``) and the
pythonic list of calls (``pythonic``).

The parser: what ``parse`` makes of finished replies (calls, text around them, blocks that are not
calls, cut blocks), and that every chunking of a reply streams what ``parse`` gives. The grammar:
compiled with SmolLM2's vocabulary, it lets a reply call the request's tools with conforming
arguments and refuses other names, other arguments and (``parallel_tool_calls: false``) a second
call. Over HTTP with the official client: SmolLM2 does not write tool calls by itself, so the test
scripts the sampled tokens (the engine's ``sample_rows`` replaced); the engine still checks each
scripted token against the request's grammar, so a script that calls an unknown function fails,
which shows the grammar is in force. The server without a parser refuses "auto" (400), as vLLM does.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from fastadapters.serving.protocol import ChatRequest
from fastadapters.serving.tool_parsers import (END, LLAMA3_START, PYTHON_END, PYTHON_START, PYTHON_TAG, START,
                                               TOOL_CALLS, HermesStream, Llama3JsonStream, MistralStream,
                                               PythonicStream, call_id, calls_of, constraint, parse, split, stream,
                                               tags_are_special)

NAMES = {"get_weather", "now"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: {} only


def block(name: str, args: dict) -> str:
    return f'{START}\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n{END}'


CALL = block("get_weather", {"city": "Paris"})
REPLIES = [
    "Let me check.\n" + CALL,
    CALL + "\n" + block("now", {}),
    "a " + CALL + "\n then more",
    "plain text, no call <tool",  # a cut start of a tag at the end is text
    "x " + f'{START}{{"name": "unknown", "arguments": {{}}}}{END} y',  # not one of the tools: text
    "x \n" + f'{START}\n{{"name": "now", "arguments": {{"a": [1,',  # cut by max_tokens: a call, cut
    f'{START}\n{{"name": "now", "arguments": {{}}}}',  # a stop string cut the closing tag: still a call
    "",
    "  \n ",
    CALL + "  " + f'{START}not json{END}',
    block("get_weather", {"city": f"a{END}b"}) + " done",  # the end tag inside an argument
    f'{START}not json{END} ' + CALL,  # never a call: the rest of the reply is its text
    "It is sunny.\n",
    f'{START}\n{{"name": "get_weather", "arguments": {{"city": "\\ud800x", "n": 1e400}}}}\n{END}',
]


def test_parse_splits_text_and_calls():
    paris = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse(REPLIES[0], NAMES) == ("Let me check.", [paris])  # (trailing whitespace: the reply made calls)
    content, calls = parse(REPLIES[1], NAMES)
    assert content is None and [c["name"] for c in calls] == ["get_weather", "now"] and calls[1]["arguments"] == "{}"
    assert parse(REPLIES[2], NAMES) == ("a \n then more", [paris])  # the text around a call, as written
    assert parse(REPLIES[3], NAMES) == (REPLIES[3], [])
    assert parse(REPLIES[4], NAMES) == (REPLIES[4], [])  # not one of the tools: text as written
    assert parse(REPLIES[5], NAMES) == ("x", [{"name": "now", "arguments": '{"a": [1,'}])  # as OpenAI cuts one
    assert split(REPLIES[5], NAMES)[2] and not split(REPLIES[6], NAMES)[2]  # ended inside its arguments, or not
    assert parse(REPLIES[6], NAMES) == (None, [{"name": "now", "arguments": "{}"}])
    assert parse("", NAMES) == (None, []) and parse("  \n ", NAMES) == (None, [])
    assert parse(REPLIES[9], NAMES) == (f'  {START}not json{END}', [paris])
    assert parse(REPLIES[10], NAMES) == (" done", [{"name": "get_weather", "arguments": json.dumps({"city": f"a{END}b"})}])
    assert parse(REPLIES[11], NAMES) == (REPLIES[11], [])
    assert parse(REPLIES[12], NAMES) == ("It is sunny.\n", [])  # text alone: as written
    # the arguments are the model's JSON text: not re-encoded (1e400 would become Infinity, which is not
    # JSON; a lone surrogate's escape would become a character no response can encode)
    assert parse(REPLIES[13], NAMES)[1] == [{"name": "get_weather", "arguments": '{"city": "\\ud800x", "n": 1e400}'}]
    # arguments that are not an object, extra keys, a name that is not a string, NaN: text
    for bad in ('{"name": "now", "arguments": "{}"}', '{"name": "now", "arguments": {}, "x": 1}',
                '{"name": 1, "arguments": {}}', '[1]', '{"name": "now", "arguments": {"a": NaN}}'):
        assert parse(START + bad + END, NAMES) == (START + bad + END, [])


def call3(name: str, args: dict, key: str = "parameters") -> str:
    """A Llama 3 JSON call."""
    return f'{{"name": "{name}", "{key}": {json.dumps(args)}}}'


L_CALL = call3("get_weather", {"city": "Paris"})
L_REPLIES = [
    L_CALL,
    PYTHON_TAG + L_CALL,  # (the tag is in the text where the request keeps special tokens)
    L_CALL + "; " + call3("now", {}),  # two calls, Llama's separator
    "Let me check. " + L_CALL,
    L_CALL + " then more",
    'x {"name": "unknown", "parameters": {}} y',  # not one of the tools: text
    '{"name": "now", "parameters": {}, "extra": 1}; ' + L_CALL,  # not a call, then a call
    '{"name": "now", "parameters": {"a": [1,',  # cut by max_tokens: a call, cut
    call3("get_weather", {"city": 'a}b"{ [x'}),  # braces and a quote inside an argument's string
    call3("now", {}, key="arguments"),  # vLLM reads "arguments" too
    "",
    "  \n ",
    ";",
    "a;",
    "Use {\"a\": 1} and {\"name\":\"now\"} here <|pyth",  # objects that do not start a call, a cut tag
    L_CALL + '; {"name"',  # a call, then what was cut before a second one: text
    '{"name": "get_weather", "parameters": {"city": "\\ud800x", "n": 1e400}}',
]


def test_llama3_parse_splits_text_and_calls():
    paris = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    now = {"name": "now", "arguments": "{}"}

    def p(text):
        return parse(text, NAMES, "llama3_json")

    assert p(L_REPLIES[0]) == p(L_REPLIES[1]) == (None, [paris])
    assert p(L_REPLIES[2]) == (None, [paris, now])  # the "; " between them is a separator
    assert p(L_REPLIES[3]) == ("Let me check.", [paris])  # the run before a call is its separator
    assert p(L_REPLIES[4]) == (" then more", [paris])  # text after a call: as written
    assert p(L_REPLIES[5]) == (L_REPLIES[5], [])
    # a call opened as the grammar writes it is a call; what follows its arguments, when it is not
    # the close (text no grammar held), is read as text
    assert p(L_REPLIES[6]) == (', "extra": 1}', [now, paris])
    assert p('{"name": "now", "arguments": {}, "extra": 1} ' + L_CALL) == \
        ('{"name": "now", "arguments": {}, "extra": 1}', [paris])  # another opening: read whole, not a call
    assert p(L_REPLIES[7]) == (None, [{"name": "now", "arguments": '{"a": [1,'}])
    assert p(L_REPLIES[8]) == (None, [{"name": "get_weather", "arguments": json.dumps({"city": 'a}b"{ [x'})}])
    assert p(L_REPLIES[9]) == (None, [now])
    assert p("") == p("  \n ") == (None, [])
    assert p(";") == (";", []) and p("a;") == ("a;", [])  # text alone: as written
    assert p(L_REPLIES[14]) == (L_REPLIES[14], [])
    assert p(L_REPLIES[15]) == ('; {"name"', [paris])
    assert p(L_REPLIES[16])[1] == [{"name": "get_weather", "arguments": '{"city": "\\ud800x", "n": 1e400}'}]
    # the other format: its tags are text, its JSON (with "arguments") a call wherever it stands, as vLLM reads it
    assert p(block("now", {})) == (f"{START}\n{END}", [now])
    assert parse(L_CALL, NAMES, "hermes") == (L_CALL, [])
    with pytest.raises(KeyError):
        stream("nope", NAMES)


def mcalls(*calls: tuple[str, dict], space: str = "") -> str:
    """A Mistral reply's calls: the tag and the array, as Mistral's templates write it."""
    return TOOL_CALLS + space + "[" + ", ".join(json.dumps({"name": n, "arguments": a}) for n, a in calls) + "]"


M_CALL = mcalls(("get_weather", {"city": "Paris"}))
M_REPLIES = [
    M_CALL,
    mcalls(("get_weather", {"city": "Paris"}), ("now", {}), space=" "),  # two calls in one array; " [" too
    "Let me check. " + M_CALL,
    M_CALL + " then more",
    "x " + mcalls(("unknown", {})) + " y",  # not one of the tools: text
    TOOL_CALLS + '[{"name": "now", "arguments": {}}, {"x": 1}] y',  # a call, then what no grammar held: text
    TOOL_CALLS + '\n[{"arguments": {}, "name": "now"}]',  # another opening: read whole, a call
    TOOL_CALLS + '  [{"name": "now", "arguments": {}}, {"name": "nope", "arguments": {}}] z ' + M_CALL,  # an array
    # with a non-call is text, and the text goes on
    TOOL_CALLS + "hello " + M_CALL,  # the tag with no array: text
    TOOL_CALLS + '[{"name": "now", "arguments": {"a": [1,',  # cut by max_tokens: a call, cut
    TOOL_CALLS + '[{"name": "now", "arguments": {}}, {"name": "get_w',  # cut after a call, in the next's opening
    TOOL_CALLS + '[{"name": "now", "arguments": {}}',  # a stop string cut the close: whole
    TOOL_CALLS + ' [{"name": "now"',  # cut in the opening: text
    mcalls(("get_weather", {"city": 'a}]b"{ [x'})),  # brackets and a quote inside an argument's string
    TOOL_CALLS + "[]",  # no calls: text
    TOOL_CALLS + '[{"name": "now", "arguments": {}}]' + TOOL_CALLS + '[{"name": "now", "arguments": {}}]',
    "",
    "  \n ",
    "Plain [text] and [TOOL_CA",  # brackets that are no tag, a cut tag at the end: text
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "\\ud800x", "n": 1e400}}]',
]


def test_mistral_parse_splits_text_and_calls():
    paris = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    now = {"name": "now", "arguments": "{}"}

    def p(text):
        return parse(text, NAMES, "mistral")

    assert p(M_REPLIES[0]) == (None, [paris])
    assert p(M_REPLIES[1]) == (None, [paris, now])
    assert p(M_REPLIES[2]) == ("Let me check.", [paris])
    assert p(M_REPLIES[3]) == (" then more", [paris])
    assert p(M_REPLIES[4]) == (M_REPLIES[4], [])
    assert p(M_REPLIES[5]) == ('}, {"x": 1}] y', [now])
    assert p(M_REPLIES[6]) == (None, [now])
    assert p(M_REPLIES[7]) == (M_REPLIES[7][:-len(M_CALL) - 1], [paris])
    assert p(M_REPLIES[8]) == (TOOL_CALLS + "hello", [paris])
    assert p(M_REPLIES[9]) == (None, [{"name": "now", "arguments": '{"a": [1,'}])
    assert split(M_REPLIES[9], NAMES, "mistral")[2] and not split(M_REPLIES[10], NAMES, "mistral")[2]
    assert p(M_REPLIES[10]) == p(M_REPLIES[11]) == (None, [now])
    assert p(M_REPLIES[12]) == (M_REPLIES[12], [])
    assert p(M_REPLIES[13]) == (None, [{"name": "get_weather", "arguments": json.dumps({"city": 'a}]b"{ [x'})}])
    assert p(M_REPLIES[14]) == (M_REPLIES[14], [])
    assert p(M_REPLIES[15]) == (None, [now, now])
    assert p("") == p("  \n ") == (None, [])
    assert p(M_REPLIES[18]) == (M_REPLIES[18], [])
    assert p(M_REPLIES[19])[1] == [{"name": "get_weather", "arguments": '{"city": "\\ud800x", "n": 1e400}'}]
    # read whole (another opening): extra keys, arguments not an object, NaN, no array: all text
    for bad in ('[{"name": "now", "arguments": {}, "id": "abcdefghi"}]', '[{"name": "now", "arguments": "{}"}]',
                '[{"name": "now", "arguments": {"a": NaN}}]', '{"name": "now", "arguments": {}}'):
        assert p(TOOL_CALLS + "\n" + bad) == (TOOL_CALLS + "\n" + bad, []), bad
    # opened as the grammar writes it: a call, and what follows its arguments (not the close) text
    assert p(TOOL_CALLS + ' [{"name": "now", "arguments": {}, "id": "abcdefghi"}]') == (', "id": "abcdefghi"}]', [now])
    assert parse(M_CALL, NAMES, "hermes") == (M_CALL, [])  # another format's tag is text there


def pcalls(*calls: str, wrap: bool = False) -> str:
    text = "[" + ", ".join(calls) + "]"
    return PYTHON_START + text + PYTHON_END if wrap else text


P_CALL = 'get_weather(city="Paris")'
P_REPLIES = [
    pcalls(P_CALL),
    pcalls(P_CALL, "now()"),
    pcalls("now()", wrap=True) + "\n",  # Llama 4's tags
    "  " + pcalls("get_weather(city='San Francisco', n=-1.5, days=[1, (2, 3)], opts={'a': None, 'b': True})"),
    "Let me check. " + pcalls(P_CALL),  # text before the list: text, as vLLM reads it
    pcalls(P_CALL) + " done",  # and after it
    "[1, 2] is a list",
    pcalls("unknown()"),
    pcalls("now(a=1, a=2)"),  # a keyword twice
    pcalls("now(1)"),  # positional
    pcalls("now(a=x)"),  # not a literal (a name: never evaluated)
    pcalls('now(a=__import__("os").getcwd())'),
    pcalls("now(a={1})"),  # a set: no JSON
    pcalls("now(a=1e400)"),  # inf: no JSON
    pcalls("now(a={1: 2})"),  # a key that is not a string
    "[now(a=1), get_weather(city=",  # cut by max_tokens: text
    "[]",
    "",
    "  \n ",
    "<|python_sta",  # a cut tag: text
    "It is sunny.\n",
    pcalls("now(a='\\ud800')"),  # an escaped lone surrogate stays escaped
    PYTHON_START + "not python" + PYTHON_END,
]


def test_pythonic_parse_splits_text_and_calls():
    paris = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    now = {"name": "now", "arguments": "{}"}

    def p(text):
        return parse(text, NAMES, "pythonic")

    assert p(P_REPLIES[0]) == (None, [paris])
    assert p(P_REPLIES[1]) == (None, [paris, now])
    assert p(P_REPLIES[2]) == (None, [now])
    content, calls = p(P_REPLIES[3])
    assert content is None and [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "San Francisco", "n": -1.5, "days": [1, [2, 3]],
                                                 "opts": {"a": None, "b": True}}
    for text in P_REPLIES[4:17] + P_REPLIES[19:21] + P_REPLIES[22:]:  # not wholly a list of calls: content as written
        assert p(text) == (text, []), text
    assert p("") == p("  \n ") == (None, [])
    assert p(P_REPLIES[21]) == (None, [{"name": "now", "arguments": '{"a": "\\ud800"}'}])
    assert p(pcalls("now(a='é')")) == (None, [{"name": "now", "arguments": '{"a": "é"}'}])
    assert not any(split(r, NAMES, "pythonic")[2] for r in P_REPLIES)  # a cut list is text, never a cut call


@pytest.mark.parametrize("parser,reply", [("hermes", r) for r in REPLIES] + [("llama3_json", r) for r in L_REPLIES]
                         + [("mistral", r) for r in M_REPLIES] + [("pythonic", r) for r in P_REPLIES])
def test_every_chunking_streams_what_parse_gives(parser, reply):
    want = parse(reply, NAMES, parser)
    rng = random.Random(len(reply))
    chunkings = [[reply[i:i + 1] for i in range(len(reply))], [reply]]
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(reply)), min(len(reply) - 1, rng.randint(0, 12)))) if reply else []
        chunkings.append([reply[a:b] for a, b in zip([0] + cuts, cuts + [len(reply)])])
    for pieces in chunkings:
        st = stream(parser, NAMES)
        events = [e for p in pieces for e in st.feed(p)] + st.finish()
        content = "".join(v for kind, v in events if kind == "content")
        assert (content or None, calls_of(events)) == want, pieces
        assert all(v for kind, v in events if kind in ("content", "call_args"))  # no empty deltas


def test_content_is_not_held_longer_than_needed():
    stream = HermesStream(NAMES)
    assert stream.feed("Hello, wor") == [("content", "Hello, wor")]
    assert stream.feed("ld <tool") == [("content", "ld")]  # " <tool" might start a call
    assert stream.feed("box") == [("content", " <toolbox")]
    assert stream.feed(" " + CALL[:20]) == []  # (it may be a call's opening)
    assert stream.feed(CALL[20:]) == [("call_open", "get_weather"), ("call_args", '{"city": "Paris"}')]


@pytest.mark.parametrize("parser,call", [("hermes", block("get_weather", {"city": "Paris, {France}"})),
                                         ("llama3_json", call3("get_weather", {"city": "Paris, {France}"})),
                                         ("mistral", mcalls(("get_weather", {"city": "Paris, {France}"})))])
def test_a_calls_arguments_stream_as_they_come(parser, call):
    # fed one character at a time: the call opens as soon as its opening is whole, and every
    # character of its arguments goes out as it arrives (nothing held back inside them)
    st = stream(parser, NAMES)
    opening = st.opening("get_weather")
    events = []
    for i, ch in enumerate(call):
        got = st.feed(ch)
        if i + 1 < len(opening):
            assert got == []
        elif i + 1 == len(opening):
            assert got == [("call_open", "get_weather")]
        elif i + 1 <= len(opening) + len('{"city": "Paris, {France}"}'):
            assert got == [("call_args", ch)], (i, ch)
        else:
            assert got == []  # the close
        events += got
    events += st.finish()
    assert calls_of(events) == [{"name": "get_weather", "arguments": '{"city": "Paris, {France}"}'}]


def test_llama3_content_is_not_held_longer_than_needed():
    st = Llama3JsonStream(NAMES)
    assert st.feed("Sure. {") == [("content", "Sure.")]  # " {" might start a call
    assert st.feed('"a": 1} ') == [("content", ' {"a": 1}')]
    assert st.feed(L_CALL[:12]) == []
    assert st.feed(L_CALL[12:] + ";") == [("call_open", "get_weather"), ("call_args", '{"city": "Paris"}')]
    assert st.feed(" ok") == [("content", "; ok")]
    assert st.finish() == []


def test_mistral_streams_each_call_of_the_array_as_it_opens():
    st = MistralStream(NAMES)
    assert st.feed("Sure. " + TOOL_CALLS + ' [{"name": "now", "arg') == [("content", "Sure.")]
    assert st.feed('uments": {}') == [("call_open", "now"), ("call_args", "{}")]
    assert st.feed('}, {"name": "get_weather", "arguments": {"ci') == [("call_open", "get_weather"),
                                                                        ("call_args", '{"ci')]
    assert st.feed('ty": "Paris"}}]') == [("call_args", 'ty": "Paris"}')]
    assert st.feed(" Done") == [("content", "  Done")]  # (the space held before the call, then the text)
    assert st.finish() == []


def test_pythonic_text_streams_and_a_list_is_read_whole():
    st = PythonicStream(NAMES)
    assert st.feed("  ") == [] and st.feed("It is ") == [("content", "  It is")]  # not a list: text as it comes
    assert st.feed("[sunny].") == [("content", " [sunny].")] and st.finish() == []
    st = PythonicStream(NAMES)
    assert st.feed(" <|python_") == [] and st.feed("start|>[now()") == [] and st.feed("]<|python_end|>") == []
    assert st.finish() == [("call", {"name": "now", "arguments": "{}"})]  # held: it might not have been calls


def test_special_call_tags_are_kept_in_the_text():
    class Tok:
        all_special_tokens = ["<s>", START, END]

    assert tags_are_special(Tok()) and not tags_are_special(object())
    assert not tags_are_special(Tok(), "llama3_json")  # its calls have no tags (<|python_tag|> is dropped)
    Tok.all_special_tokens = ["<s>"]
    assert not tags_are_special(Tok())

    class Added:  # an added token marked special (decode leaves it out), not in all_special_tokens
        def __init__(self, text, special):
            self.text, self.special = text, special

        def __str__(self):
            return self.text

    class MistralTok:
        all_special_tokens = ["<s>", "</s>"]
        added_tokens_decoder = {5: Added(TOOL_CALLS, True), 6: Added(START, False)}

    assert tags_are_special(MistralTok(), "mistral") and not tags_are_special(MistralTok(), "hermes")
    MistralTok.added_tokens_decoder = {5: Added(TOOL_CALLS, False)}
    assert not tags_are_special(MistralTok(), "mistral")  # spelt in ordinary tokens: left in the text anyway
    assert not tags_are_special(MistralTok(), "pythonic")


def test_call_ids():
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in {call_id("mistral") for _ in range(50)})
    assert len({call_id("mistral") for _ in range(50)}) == 50
    assert call_id("hermes").startswith("chatcmpl-tool-") and call_id(None) != call_id(None)


def _auto(parser="hermes", **kw):
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, NOW], **kw)
    req._tool_parser = parser
    return req


def test_llama3_json_is_xgrammars_llama_format():
    # the trigger and each tool's begin / end as xgrammar's builtin "llama" structural tag writes them
    req = _auto("llama3_json", parallel_tool_calls=False)
    assert req.tool_call() == ("auto", "llama3_json")
    tag = json.loads(req.structured().value)["format"]
    assert (tag["type"], tag["triggers"], tag["stop_after_first"]) == ("triggered_tags", [LLAMA3_START], True)
    assert [(t["begin"], t["end"]) for t in tag["tags"]] == \
        [('{"name": "get_weather", "parameters": ', "}"), ('{"name": "now", "parameters": ', "}")]
    with pytest.raises(ValueError, match="parser: got 'x'; valid: one of hermes, llama3_json, mistral, pythonic"):
        constraint({"now": {}}, True, "x")


def test_mistral_is_one_array_after_the_tag_and_pythonic_is_unconstrained():
    tag = json.loads(_auto("mistral", parallel_tool_calls=False).structured().value)["format"]
    assert (tag["type"], tag["triggers"], tag["stop_after_first"]) == ("triggered_tags", [TOOL_CALLS], True)
    (array,) = tag["tags"]
    assert (array["begin"], array["end"]) == (TOOL_CALLS, "]")
    calls = array["content"]["elements"][1]
    assert (calls["separator"], calls["at_least_one"], calls["stop_after_first"]) == (", ", True, True)
    assert [(t["begin"], t["end"]) for t in calls["tags"]] == \
        [('{"name": "get_weather", "arguments": ', "}"), ('{"name": "now", "arguments": ', "}")]
    req = _auto("pythonic")
    assert req.tool_call() == ("auto", "pythonic") and req.structured() is None  # (the tools are still checked)
    assert _auto("pythonic", response_format={"type": "json_object"}).structured().kind == "json_object"


def test_auto_is_a_structural_tag_over_the_tools_and_refused_without_a_parser():
    req = _auto()
    assert req.tool_call() == ("auto", "hermes")
    s = req.structured()
    tag = json.loads(s.value)["format"]
    assert (s.source, s.kind, tag["type"], tag["triggers"], tag["stop_after_first"]) == \
        ("tools", "structural_tag", "triggered_tags", [START], False)  # ("auto" by default: named after tools)
    assert _auto(tool_choice="auto").structured().source == "tool_choice"
    assert [t["content"]["json_schema"] for t in tag["tags"]] == \
        [WEATHER["function"]["parameters"], {"type": "object", "properties": {}}]
    assert json.loads(_auto(parallel_tool_calls=False).structured().value)["format"]["stop_after_first"] is True
    assert _auto(stop=["x"]).structured() is not None  # a cut call stays text: stop strings are fine here
    with pytest.raises(ValueError, match="only one structured-output constraint"):
        _auto(response_format={"type": "json_object"}).structured()
    # the format's arguments are an object: a tool whose parameters may be anything else is refused
    echo = {"type": "function", "function": {"name": "echo", "parameters": {"type": "string"}}}
    for params in ({"type": "string"}, {"type": ["object", "null"]}, {"properties": {"a": {}}}):
        echo["function"]["parameters"] = params
        req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, echo])
        req._tool_parser = "hermes"
        with pytest.raises(ValueError, match=r"tools\[1\]: parameters of 'echo' .* valid with tool_choice 'auto'"):
            req.structured()
    plain = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    with pytest.raises(ValueError, match="--enable-auto-tool-choice --tool-call-parser hermes"):
        plain.tool_call()


def test_bad_tool_flags_exit_2(tmp_path, capsys):
    from fastadapters.serving.serve import main

    assert main(["--base-model", str(tmp_path), "--enable-auto-tool-choice"]) == 2
    assert "--tool-call-parser" in capsys.readouterr().err
    assert main(["--base-model", str(tmp_path), "--tool-call-parser", "hermes"]) == 2
    assert "--enable-auto-tool-choice" in capsys.readouterr().err
    assert main(["--base-model", str(tmp_path), "--enable-auto-tool-choice", "--tool-call-parser", "nope"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(p in err for p in ("hermes", "llama3_json", "mistral", "pythonic"))


def test_pythonic_needs_no_xgrammar(tmp_path, capsys, monkeypatch):
    from fastadapters.serving import structured
    from fastadapters.serving.serve import main

    def missing():
        raise structured.StructuredUnavailable("structured output needs xgrammar")

    monkeypatch.setattr(structured, "_xgrammar", missing)
    assert main(["--base-model", str(tmp_path), "--enable-auto-tool-choice", "--tool-call-parser", "mistral"]) == 2
    assert "--enable-auto-tool-choice: structured output needs xgrammar" in capsys.readouterr().err
    main(["--base-model", str(tmp_path), "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"])
    assert "xgrammar" not in capsys.readouterr().err  # (it stops later, at the empty model folder)


# ---- with SmolLM2's vocabulary (grammar) and through the server

@pytest.fixture(scope="module")
def smol():
    from .real_model import smollm2_dir

    pytest.importorskip("xgrammar")
    folder, why = smollm2_dir()
    if folder is None:
        pytest.skip(why)
    return folder


@pytest.fixture(scope="module")
def compiled(smol):
    """compile(parser, parallel) -> the "auto" grammar of WEATHER and NOW with SmolLM2's vocabulary;
    allowed(grammar, text): whether it lets a reply of ``text`` (then EOS) through."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    tools = {"get_weather": WEATHER["function"]["parameters"], "now": {"type": "object", "properties": {}}}

    def compile(parser: str, parallel: bool):
        return compiler.compile_structural_tag(constraint(tools, parallel, parser))

    def allowed(grammar, text: str) -> bool:
        m = xgr.GrammarMatcher(grammar)
        return all(m.accept_token(i) for i in tok.encode(text, add_special_tokens=False)) and \
            m.accept_token(tok.eos_token_id)
    return compile, allowed


def test_the_grammar_holds_calls_to_the_tools(compiled):
    compile, allowed = compiled
    for parallel in (True, False):
        g = compile("hermes", parallel)
        assert allowed(g, "Let me check.\n" + CALL) and allowed(g, "just text") and allowed(g, block("now", {}))
        assert allowed(g, block("get_weather", {"city": f"a{END}b"}))  # (why parse looks past an end tag)
        assert not allowed(g, block("get_time", {}))  # not a tool
        assert not allowed(g, block("get_weather", {"town": "Paris"}))  # arguments outside the schema
        assert not allowed(g, block("get_weather", {}))  # a required argument missing
        assert allowed(g, CALL + "\n" + block("now", {})) is parallel  # a second call


def test_the_llama3_grammar_holds_calls_to_the_tools(compiled):
    compile, allowed = compiled
    for parallel in (True, False):
        g = compile("llama3_json", parallel)
        assert allowed(g, "Let me check. " + L_CALL) and allowed(g, "just text, {\"a\": 1}") and allowed(g, call3("now", {}))
        assert allowed(g, call3("get_weather", {"city": 'a}b"{'}))
        assert not allowed(g, call3("get_time", {}))  # not a tool
        assert not allowed(g, call3("now", {}, key="arguments"))  # the format's key is "parameters"
        assert not allowed(g, call3("get_weather", {"town": "Paris"}))  # arguments outside the schema
        assert not allowed(g, call3("get_weather", {}))  # a required argument missing
        assert allowed(g, L_CALL + "; " + call3("now", {})) is parallel  # a second call


def test_the_mistral_grammar_holds_calls_to_the_tools(compiled):
    compile, allowed = compiled
    two = mcalls(("get_weather", {"city": "Paris"}), ("now", {}), space=" ")
    for parallel in (True, False):
        g = compile("mistral", parallel)
        assert allowed(g, "Let me check. " + M_CALL) and allowed(g, "just [text]") and allowed(g, mcalls(("now", {})))
        assert allowed(g, mcalls(("now", {}), space=" ")) and allowed(g, M_REPLIES[13])
        assert not allowed(g, mcalls(("get_time", {})))  # not a tool
        assert not allowed(g, mcalls(("get_weather", {"town": "Paris"})))  # arguments outside the schema
        assert not allowed(g, mcalls(("get_weather", {})))  # a required argument missing
        assert not allowed(g, TOOL_CALLS + "[]") and not allowed(g, TOOL_CALLS + "hello")  # the tag opens an array
        assert not allowed(g, TOOL_CALLS + '[{"name": "now", "arguments": {}, "id": "abcdefghi"}]')
        assert allowed(g, two) is parallel  # a second call
        assert allowed(g, M_CALL + " " + M_CALL) is parallel


def _serve(smol, parser: str):
    """(engine, openai client) of a live server of SmolLM2 with ``parser`` for tool_choice "auto"."""
    openai = pytest.importorskip("openai")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastadapters.serving.api import create_app
    from fastadapters.serving.engine import Engine
    from .live_server import live_server

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(smol)
    engine = Engine(AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval(), tok, max_num_seqs=2,
                    max_model_len=256, backend="torch")
    try:
        with live_server(create_app(engine, "smol", base_path=smol, tool_call_parser=parser)) as url:
            yield engine, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(smol):
    yield from _serve(smol, "hermes")


@pytest.fixture
def script(served, monkeypatch):
    """Replace the engine's sampling with a script: ``script(text)`` makes the next request's tokens
    ``text``'s tokens, then EOS (one request at a time)."""
    return _scripted(served[0], monkeypatch)


def settle(engine, timeout: float = 30.0) -> None:
    """Wait until the engine runs no request: one a stop string ended may still take a step (its stop
    is checked while the next step runs), and the script's tokens are for the next request alone."""
    import time

    deadline = time.monotonic() + timeout
    while (snap := engine.snapshot())["running"] or snap["live_requests"]:
        assert time.monotonic() < deadline, snap
        time.sleep(0.01)


MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def accumulate(chunks) -> list[tuple[str, str, str]]:
    """A streamed choice's calls as OpenAI's clients put them together: (name, arguments, id) per
    index, the first delta of an index giving its id and name, every delta adding to its arguments."""
    calls: dict[int, list] = {}
    for ch in chunks:
        for tc in ch.delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.function.name, tc  # a call's first delta names it
                calls[tc.index] = [tc.function.name, "", tc.id]
            else:
                assert tc.id is None and tc.function.name is None, tc
            calls[tc.index][1] += tc.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(c) for _, c in sorted(calls.items())]


def cut_points(tokenizer, reply: str, opening: str) -> tuple[int, str]:
    """The number of ``reply``'s tokens at which its text first holds the whole call ``opening``, and
    the call's arguments as far as one token more takes them."""
    ids = tokenizer.encode(reply, add_special_tokens=False)
    k = next(k for k in range(1, len(ids) + 1) if opening in tokenizer.decode(ids[:k]))
    text = tokenizer.decode(ids[:k + 1])
    return k, text[text.index(opening) + len(opening):]


def test_auto_replies_with_text_and_calls_streamed_or_not(served, script):
    from .serve_helpers import assert_no_leaks

    engine, client = served
    assert not tags_are_special(engine.tokenizer)  # SmolLM2 has no such tokens: spelt in ordinary ones
    tools = [WEATHER, NOW]
    script("Let me check.\n" + CALL + "\n" + block("now", {}))
    r = client.chat.completions.create(model="smol", messages=MESSAGES, tools=tools, max_tokens=64)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."  # (its trailing newline dropped)
    got = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]
    assert got == [("get_weather", {"city": "Paris"}), ("now", {})]
    assert len({t.id for t in c.message.tool_calls}) == 2
    script("Let me check.\n" + CALL + "\n" + block("now", {}))
    chunks = [ch.choices[0] for ch in client.chat.completions.create(
        model="smol", messages=MESSAGES, tools=tools, max_tokens=64, stream=True) if ch.choices]
    assert "".join(ch.delta.content or "" for ch in chunks) == "Let me check."
    assert [(i, name, json.loads(args)) for i, (name, args, _) in enumerate(accumulate(chunks))] == \
        [(0, "get_weather", {"city": "Paris"}), (1, "now", {})]
    assert len([tc for ch in chunks for tc in (ch.delta.tool_calls or []) if tc.index == 0]) > 2  # arguments in pieces
    assert chunks[-1].finish_reason == "tool_calls" and all(ch.finish_reason is None for ch in chunks[:-1])
    # text only: a plain reply
    script("It is sunny.")
    r = client.chat.completions.create(model="smol", messages=MESSAGES, tools=tools, tool_choice="auto",
                                       max_tokens=16)
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == \
        ("It is sunny.", None, "stop")
    # cut by max_tokens: before the call's opening is whole, text; in its arguments, the call as far
    # as it got (as OpenAI's API cuts one), finish "length", streamed or not
    reply = "Let me check.\n" + CALL
    opened, cut = cut_points(engine.tokenizer, reply, HermesStream.opening("get_weather"))
    script(reply)
    c = client.chat.completions.create(model="smol", messages=MESSAGES, tools=tools, max_tokens=opened - 1).choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls and c.message.content.startswith("Let me check.")
    assert START in c.message.content
    for streamed in (False, True):
        script(reply)
        r = client.chat.completions.create(model="smol", messages=MESSAGES, tools=tools, max_tokens=opened + 1,
                                           stream=streamed)
        if streamed:
            chunks = [ch.choices[0] for ch in r if ch.choices]
            content, calls, reason = ("".join(ch.delta.content or "" for ch in chunks), accumulate(chunks),
                                      chunks[-1].finish_reason)
        else:
            c = r.choices[0]
            content, reason = c.message.content, c.finish_reason
            calls = [(t.function.name, t.function.arguments, t.id) for t in c.message.tool_calls]
        assert (content, reason, [(n, a) for n, a, _ in calls]) == ("Let me check.", "length", [("get_weather", cut)])
    # a stop string: inside the arguments, the call as far as it got and "stop" (not "tool_calls": it
    # is not whole); in the close, the call is whole
    for stop, reason, args in (("Paris", "stop", '{"city": "'), ("</tool_call>", "tool_calls", '{"city": "Paris"}')):
        for streamed in (False, True):
            script(reply)
            r = client.chat.completions.create(model="smol", messages=MESSAGES, tools=tools, max_tokens=64,
                                               stop=[stop], stream=streamed)
            if streamed:
                chunks = [ch.choices[0] for ch in r if ch.choices]
                got = (chunks[-1].finish_reason, [(n, a) for n, a, _ in accumulate(chunks)])
            else:
                got = (r.choices[0].finish_reason, [(t.function.name, t.function.arguments)
                                                    for t in r.choices[0].message.tool_calls])
            assert got == (reason, [("get_weather", args)]), (stop, streamed)
    # one call with parallel_tool_calls false: the reply ends there
    script(CALL)
    r = client.chat.completions.create(model="smol", messages=MESSAGES, tools=tools, parallel_tool_calls=False,
                                       max_tokens=64)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    assert_no_leaks(engine)


def test_the_grammar_is_in_force_over_http(served, script):
    """A scripted call the grammar does not allow (an unknown function; a second call with
    parallel_tool_calls false) ends that request with an error; the server serves on."""
    import openai

    from .serve_helpers import assert_no_leaks

    engine, client = served
    for text, kw in ((block("get_time", {}), {}), (CALL + "\n" + block("now", {}), {"parallel_tool_calls": False})):
        script(text)
        with pytest.raises(openai.InternalServerError, match="not allowed by the request's grammar"):
            client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER, NOW], max_tokens=64, **kw)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER], extra_body={"echo": True})
    script("fine")
    r = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=4)
    assert r.choices[0].message.content == "fine"
    assert_no_leaks(engine)


def test_text_around_a_call_and_arguments_as_written_streamed_or_not(served, script):
    """The text on both sides of a call is the content, as written; a call's arguments are the
    model's JSON text (an escaped lone surrogate and a number past float range must not make the
    reply unencodable or invalid JSON)."""
    engine, client = served
    odd = f'{START}\n{{"name": "get_weather", "arguments": {{"city": "\\ud800x"}}}}\n{END}'
    for reply, content, args in (("Checking: " + CALL + "\nDone.", "Checking: \nDone.", '{"city": "Paris"}'),
                                 (odd, None, '{"city": "\\ud800x"}')):
        script(reply)
        r = client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER], max_tokens=64)
        c = r.choices[0]
        assert (c.message.content, [t.function.arguments for t in c.message.tool_calls], c.finish_reason) == \
            (content, [args], "tool_calls")
        script(reply)
        chunks = [ch.choices[0] for ch in client.chat.completions.create(
            model="smol", messages=MESSAGES, tools=[WEATHER], max_tokens=64, stream=True) if ch.choices]
        assert ("".join(ch.delta.content or "" for ch in chunks) or None) == content
        assert [a for _, a, _ in accumulate(chunks)] == [args]


@pytest.fixture(scope="module")
def served_llama3(smol):
    yield from _serve(smol, "llama3_json")


def test_llama3_json_over_http_streamed_or_not(served_llama3, monkeypatch):
    """The llama3_json server: a reply's calls (two, with Llama's separator) and its text, streamed or
    not; the grammar in force (an unknown function ends the request with an error); a call cut by
    max_tokens stays text."""
    import openai

    from .serve_helpers import assert_no_leaks

    engine, client = served_llama3
    script = _scripted(engine, monkeypatch)

    reply = "Let me check. " + L_CALL + "; " + call3("now", {})
    want = [("get_weather", {"city": "Paris"}), ("now", {})]
    script(reply)
    c = client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER, NOW], max_tokens=64).choices[0]
    assert (c.finish_reason, c.message.content) == ("tool_calls", "Let me check.")
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == want
    script(reply)
    chunks = [ch.choices[0] for ch in client.chat.completions.create(
        model="smol", messages=MESSAGES, tools=[WEATHER, NOW], max_tokens=64, stream=True) if ch.choices]
    assert "".join(ch.delta.content or "" for ch in chunks) == "Let me check."
    assert [(name, json.loads(args)) for name, args, _ in accumulate(chunks)] == want
    assert chunks[-1].finish_reason == "tool_calls"
    script(call3("get_time", {}))
    with pytest.raises(openai.InternalServerError, match="not allowed by the request's grammar"):
        client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER, NOW], max_tokens=64)
    opened, cut = cut_points(engine.tokenizer, L_CALL, Llama3JsonStream.opening("get_weather"))
    script(L_CALL)
    c = client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER], max_tokens=opened - 1).choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls and c.message.content.startswith('{"name": ')
    script(L_CALL)
    c = client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER], max_tokens=opened + 1).choices[0]
    assert (c.finish_reason, c.message.content, [(t.function.name, t.function.arguments) for t in c.message.tool_calls]) \
        == ("length", None, [("get_weather", cut)])
    script("It is sunny; {\"a\": 1}")
    c = client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER], max_tokens=16).choices[0]
    assert (c.message.content, c.message.tool_calls, c.finish_reason) == ('It is sunny; {"a": 1}', None, "stop")
    assert_no_leaks(engine)


@pytest.fixture(scope="module")
def served_mistral(smol):
    yield from _serve(smol, "mistral")


@pytest.fixture(scope="module")
def served_pythonic(smol):
    yield from _serve(smol, "pythonic")


def _scripted(engine, monkeypatch):
    """``script(text)``: the engine's next request samples ``text``'s tokens, then EOS."""
    from fastadapters.serving import engine as engine_mod

    real, queue = engine_mod.sample_rows, []

    def scripted(logits, params, generators):
        tokens, errors = real(logits, params, generators)
        return [queue.pop(0) if queue else engine.tokenizer.eos_token_id for _ in tokens], errors

    monkeypatch.setattr(engine_mod, "sample_rows", scripted)

    def script(text):
        settle(engine)
        queue[:] = engine.tokenizer.encode(text, add_special_tokens=False)
    return script


def _both(client, script, reply: str, **kw):
    """The reply ``reply`` scripted, non-streamed then streamed: [(content, [(name, arguments, id)],
    finish_reason)] for each."""
    out = []
    script(reply)
    c = client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER, NOW], **kw).choices[0]
    out.append((c.message.content, [(t.function.name, t.function.arguments, t.id) for t in c.message.tool_calls or []],
                c.finish_reason))
    script(reply)
    chunks = [ch.choices[0] for ch in client.chat.completions.create(
        model="smol", messages=MESSAGES, tools=[WEATHER, NOW], stream=True, **kw) if ch.choices]
    out.append(("".join(ch.delta.content or "" for ch in chunks) or None, accumulate(chunks), chunks[-1].finish_reason))
    return out


def test_mistral_over_http_streamed_or_not(served_mistral, monkeypatch):
    """The mistral server: text and an array of two calls, streamed or not, with Mistral's 9-character
    ids; the grammar in force (an unknown function, a second call with parallel_tool_calls false)."""
    import openai

    from .serve_helpers import assert_no_leaks

    engine, client = served_mistral
    script = _scripted(engine, monkeypatch)
    assert not tags_are_special(engine.tokenizer, "mistral")  # SmolLM2 spells the tag in ordinary tokens
    reply = "Let me check. " + mcalls(("get_weather", {"city": "Paris"}), ("now", {}))
    for content, calls, reason in _both(client, script, reply, max_tokens=64):
        assert (content, reason) == ("Let me check.", "tool_calls")
        assert [(n, json.loads(a)) for n, a, _ in calls] == [("get_weather", {"city": "Paris"}), ("now", {})]
        assert all(len(i) == 9 and i.isalnum() for _, _, i in calls) and len({i for _, _, i in calls}) == 2
    for text, kw in ((mcalls(("get_time", {})), {}), (reply, {"parallel_tool_calls": False})):
        script(text)
        with pytest.raises(openai.InternalServerError, match="not allowed by the request's grammar"):
            client.chat.completions.create(model="smol", messages=MESSAGES, tools=[WEATHER, NOW], max_tokens=64, **kw)
    assert _both(client, script, "Plain [text].", max_tokens=16) == [("Plain [text].", [], "stop")] * 2
    assert_no_leaks(engine)


def test_pythonic_over_http_streamed_or_not(served_pythonic, monkeypatch):
    """The pythonic server: a list of calls (content None), streamed or not; a list cut by
    max_tokens, and text around a list, come back as content, as vLLM returns them."""
    from .serve_helpers import assert_no_leaks

    engine, client = served_pythonic
    script = _scripted(engine, monkeypatch)
    for content, calls, reason in _both(client, script, pcalls(P_CALL, "now()"), max_tokens=64):
        assert (content, reason) == (None, "tool_calls")
        assert [(n, json.loads(a)) for n, a, _ in calls] == [("get_weather", {"city": "Paris"}), ("now", {})]
        assert all(i.startswith("chatcmpl-tool-") for _, _, i in calls)
    cut = pcalls(P_CALL, "now()")
    n = len(engine.tokenizer.encode(cut, add_special_tokens=False))
    got = _both(client, script, cut, max_tokens=n - 2)
    assert [(c, calls, r) for c, calls, r in got] == [(got[0][0], [], "length")] * 2 and cut.startswith(got[0][0])
    text = "See " + pcalls(P_CALL)
    assert _both(client, script, text, max_tokens=64) == [(text, [], "stop")] * 2
    assert_no_leaks(engine)
