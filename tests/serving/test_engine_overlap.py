"""Outputs overlap the next engine step (engine.py's module docstring): with ``start()`` the output
thread detokenises, checks stop strings and calls ``on_output`` for step k while the engine thread
runs step k+1. Counted and ordered, never timed:

- a started engine gives the same per-request text, token ids, finish reasons and
  ``completion_tokens`` as the inline path (``run_until_done``), with stop strings, EOS, ``max_tokens``
  and a tokenizer whose characters span tokens (partial UTF-8);
- overlap is real: the callback of step k waits for the forward of step k+1 to start;
- a stop string found by the output thread: nothing after the final output, the one token the engine
  generated past it is dropped, blocks freed, ``finished_stop`` counted;
- a raising callback cancels only its request; ``stop()`` gives every request in flight one final
  output; a dead output thread is reported by ``health()`` and the engine goes on inline.
"""
from __future__ import annotations

import threading

import pytest

import fastadapters.serving.engine as engine_mod
from fastadapters.serving.sampling import SamplingParams
from .char_tokenizer import char_tokenizer
from .serve_helpers import assert_no_leaks, prompts, tiny_engine
from .serve_helpers import one_thread  # noqa: F401 - fixture

WAIT = 60  # bound on every wait: a broken engine fails the test instead of hanging it


class ByteTokenizer:
    """ids -> bytes, some of them single bytes of multi-byte UTF-8 characters (é, 東, 🚀), so a
    character may span tokens and decoding ends in U+FFFD until it is whole; ids 0-2 are special."""

    PIECES = ([b"<pad>", b"<s>", b"<unk>"] + [bytes([c]) for c in b" abcdefghijklmnopqrstuvwxyz.,"]
              + [b"\xc3", b"\xa9", b"\xe6", b"\x9d", b"\xb1", b"\xf0", b"\x9f", b"\x9a", b"\x80"]
              + [s.encode() for s in ("é", "東", "🚀", "ü", "½", "—", "ñ", "日本", " café", "ö", "ß")]
              + [bytes([c]) for c in b"ABCDEFGHIJKL"])

    def __init__(self):
        assert len(self.PIECES) == 64, len(self.PIECES)

    def decode(self, ids, skip_special_tokens=True, **kw):
        return b"".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i < 3)).decode(
            "utf-8", errors="replace")


def _collect():
    """(callback, outputs by request id, event set once ``n`` final outputs arrived)."""
    outs: dict[str, list] = {}
    finals = []
    done = threading.Event()
    lock = threading.Lock()

    def cb(out):
        with lock:
            outs.setdefault(out.request_id, []).append(out)
            if out.finished:
                finals.append(out)
                if len(finals) >= cb.expected:
                    done.set()

    cb.expected = 1 << 30
    return cb, outs, done


def _summary(outs: list) -> dict:
    """What a client sees of one request; checks that its final output is the last, exactly once."""
    assert outs and outs[-1].finished, outs
    assert sum(o.finished for o in outs) == 1, outs
    return {"text": "".join(o.text for o in outs), "ids": [t for o in outs for t in o.token_ids],
            "reason": outs[-1].finish_reason, "completion_tokens": outs[-1].completion_tokens,
            "completion_counts": [o.completion_tokens for o in outs]}


def _run(tok, ps, params, threaded: bool, eos=None, **kw):
    engine = tiny_engine(tokenizer=tok, max_model_len=128, **kw)
    if eos is not None:
        engine.eos_ids = {eos}
    cb, outs, done = _collect()
    cb.expected = len(ps)
    reqs = [engine.submit(p, sp, on_output=cb) for p, sp in zip(ps, params)]
    if threaded:
        engine.start()
        try:
            assert done.wait(WAIT), "not every request got its final output"
        finally:
            engine.stop()
    else:
        engine.run_until_done()
    assert_no_leaks(engine)
    return engine, reqs, [_summary(outs[r.request_id]) for r in reqs]


def _stats(engine) -> dict:
    return {k: v for k, v in engine.stats.items() if k.startswith("finished_") and v} | {
        "request_errors": engine.stats.get("request_errors", 0)}


@pytest.mark.parametrize("kind", ["char", "bytes"])
def test_started_engine_gives_the_inline_outputs(kind):
    tok = char_tokenizer() if kind == "char" else ByteTokenizer()
    ps = prompts([5, 9, 3, 7, 4, 6, 8, 2], seed=21)
    n = 24
    # the texts without stops, to choose stop strings inside them (inline: the reference path)
    _, _, full = _run(tok, ps, [SamplingParams(max_tokens=n, temperature=0)] * len(ps), threaded=False)
    texts = [f["text"] for f in full]
    stops = [[texts[0][-2:]], [texts[1][10:13], "zzzz"], [], [texts[3][3:5]],  # [0]: on its last token
             [texts[4][0:1]], [], ["\ufffd"] if kind == "bytes" else [texts[6][7:9]], [texts[7][15:17]]]
    params = [SamplingParams(max_tokens=n if i != 5 else 11, temperature=0, stop=[s for s in st if s])
              for i, st in enumerate(stops)]
    eos = full[2]["ids"][9]  # request 2 (and any other that draws this token first) ends at EOS
    e_inline, r_inline, inline = _run(tok, ps, params, threaded=False, eos=eos)
    e_thread, r_thread, threaded = _run(tok, ps, params, threaded=True, eos=eos)
    assert threaded == inline
    for a, b in zip(r_inline, r_thread):
        assert (a.output_ids, a.text, a.finish_reason) == (b.output_ids, b.text, b.finish_reason)
    reasons = [s["reason"] for s in inline]
    assert "stop" in reasons and "length" in reasons and reasons[5] in ("length", "stop")
    assert _stats(e_thread) == _stats(e_inline)
    if kind == "char":  # a stop completed by the token that also reached max_tokens reports "stop"
        assert inline[0]["reason"] == "stop" and inline[0]["completion_tokens"] == n
        assert inline[2]["reason"] == "stop" and inline[2]["ids"][-1] == eos


def test_callback_of_step_k_runs_while_the_forward_of_step_k_plus_1_runs(monkeypatch):
    forwards = []
    next_started = threading.Event()
    real = engine_mod.paged_forward

    def counting(*a, **k):
        forwards.append(1)
        if len(forwards) >= 2:
            next_started.set()
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "paged_forward", counting)
    engine = tiny_engine(tokenizer=char_tokenizer(), max_model_len=64)
    seen = []

    def cb(out):
        if not seen:  # the output of step 1 (prefill): waits for step 2's forward
            seen.append((threading.current_thread().name, len(forwards), next_started.wait(10)))
        else:
            seen.append((threading.current_thread().name, len(forwards), True))

    req = engine.submit(prompts([6], seed=3)[0], SamplingParams(max_tokens=5, temperature=0), on_output=cb)
    engine.start()
    try:
        deadline = threading.Event()
        for _ in range(WAIT * 10):
            if req.finish_reason is not None and len(seen) == 5:
                break
            deadline.wait(0.1)
    finally:
        engine.stop()
    name, at_call, waited = seen[0]
    assert waited, "the callback of step 1 ran before step 2's forward could start: no overlap"
    # it started after step 1's forward, and before step 3's: the engine runs at most one step ahead
    assert at_call in (1, 2) and len(forwards) == 5
    assert {s[0] for s in seen} == {"fastadapters-output"}
    assert len(seen) == 5 and req.finish_reason == "length"
    assert_no_leaks(engine)


def test_a_callback_may_wait_for_an_engine_command():
    """``call`` (e.g. load_adapter) from a callback: the engine, waiting for the output thread that
    runs that callback, takes the command instead of waiting for it forever."""
    engine = tiny_engine(tokenizer=char_tokenizer(), max_model_len=64)
    got = []

    def cb(out):
        if not got:
            for _ in range(WAIT * 100):  # the engine has run step 2 and is about to wait for step 1's outputs
                if engine.stats["steps"] >= 2:
                    break
                threading.Event().wait(0.01)
            got.append(engine.call(lambda: "ran in " + threading.current_thread().name, timeout=10))
        else:
            got.append(out.finished)

    req = engine.submit(prompts([4], seed=5)[0], SamplingParams(max_tokens=4, temperature=0), on_output=cb)
    engine.start()
    try:
        for _ in range(WAIT * 10):
            if len(got) == 4:
                break
            threading.Event().wait(0.1)
    finally:
        engine.stop()
    assert got == ["ran in fastadapters-engine", False, False, True] and req.finish_reason == "length"
    assert_no_leaks(engine)


class _Lagging:
    """The char tokenizer, but in the output thread each decode of ``req`` waits until the engine
    has generated a token past the ones being decoded: the output thread is a step behind."""

    def __init__(self, tok):
        self.tok, self.req = tok, None

    def decode(self, ids, **kw):
        req = self.req
        if threading.current_thread().name == "fastadapters-output" and req is not None:
            want = len(req.metadata["out_ids"]) + 1
            for _ in range(WAIT * 100):
                if len(req.output_ids) >= want or req.finish_reason is not None:
                    break
                threading.Event().wait(0.01)
        return self.tok.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_stop_string_found_by_the_output_thread_drops_what_the_engine_ran_ahead():
    tok = _Lagging(char_tokenizer())
    p = prompts([5], seed=4)[0]
    full = tiny_engine(tokenizer=tok, max_model_len=128).generate([p], SamplingParams(max_tokens=30,
                                                                                    temperature=0))[0].text
    stop = full[19:21]  # (here "P3", first found 21 characters in)
    sp = SamplingParams(max_tokens=30, temperature=0, stop=[stop])
    ref = tiny_engine(tokenizer=tok, max_model_len=128).generate([p], sp)[0]
    assert ref.finish_reason == "stop" and len(ref.output_ids) < 30

    engine = tiny_engine(tokenizer=tok, max_model_len=128)
    cb, outs, done = _collect()
    cb.expected = 1
    req = engine.submit(p, sp, on_output=cb)
    tok.req = req
    engine.start()
    try:
        assert done.wait(WAIT)
        engine.call(lambda: None, timeout=WAIT)  # a step boundary: the engine has taken the stop in
        engine.call(lambda: None, timeout=WAIT)
        assert_no_leaks(engine)  # freed by the engine thread, before stop()
    finally:
        engine.stop()
    got = _summary(outs[req.request_id])
    assert got["reason"] == "stop" and got["text"] == ref.text == full[:full.find(stop)]
    assert got["ids"] == ref.output_ids == req.output_ids  # the token past the stop was dropped
    assert got["completion_tokens"] == len(ref.output_ids)
    # the engine generated exactly one token past the stop (it runs at most one step ahead)
    assert engine.stats["generation_tokens"] == len(ref.output_ids) + 1
    assert engine.stats["finished_stop"] == 1 and sum(v for k, v in engine.stats.items()
                                                       if k.startswith("finished_")) == 1
    assert req.finish_reason == "stop" and req.text == ref.text
    assert_no_leaks(engine)


@pytest.mark.filterwarnings("ignore:output callback of")
def test_a_raising_callback_cancels_only_its_request():
    tok = char_tokenizer()
    ps = prompts([4, 6, 5], seed=8)
    sp = SamplingParams(max_tokens=8, temperature=0)
    want = [r.output_ids for r in tiny_engine(tokenizer=tok, max_model_len=64).generate(ps, sp)]
    engine = tiny_engine(tokenizer=tok, max_model_len=64)
    cb, outs, done = _collect()
    cb.expected = 3

    def breaking(out):
        cb(out)
        if len(outs[out.request_id]) == 2:
            raise RuntimeError("the client's queue broke")

    reqs = [engine.submit(p, sp, on_output=breaking if i == 1 else cb) for i, p in enumerate(ps)]
    engine.start()
    try:
        assert done.wait(WAIT)
    finally:
        engine.stop()
    bad = _summary(outs[reqs[1].request_id])
    assert bad["reason"] == "abort" and reqs[1].cancelled and reqs[1].finish_reason == "abort"
    assert len(outs[reqs[1].request_id]) == 3 and bad["completion_tokens"] == 2
    assert reqs[1].output_ids == want[1][:2]
    for i in (0, 2):
        s = _summary(outs[reqs[i].request_id])
        assert s["reason"] == "length" and s["ids"] == want[i] == reqs[i].output_ids
    assert engine.stats["finished_abort"] == 1 and engine.stats["finished_length"] == 2
    assert_no_leaks(engine)


def test_stop_with_requests_in_flight_gives_each_one_final_output():
    tok = char_tokenizer()
    engine = tiny_engine(tokenizer=tok, max_model_len=128, max_num_seqs=4)
    cb, outs, _ = _collect()
    first = threading.Event()

    def on(out):
        cb(out)
        if sum(len(v) >= 2 for v in outs.values()) >= 4:  # the 4 running ones are generating
            first.set()

    ps = prompts([3, 5, 4, 6, 2, 7], seed=9)
    reqs = [engine.submit(p, SamplingParams(max_tokens=100, temperature=0, stop=["zzzzz"] if i % 2 else []),
                          on_output=on) for i, p in enumerate(ps)]  # 6 requests, 4 running, 2 waiting
    engine.start()
    try:
        assert first.wait(WAIT)
    finally:
        engine.stop()
    for r in reqs:
        s = _summary(outs[r.request_id])
        assert s["reason"] in ("abort", "length") and r.finish_reason == s["reason"]
    assert sum(v for k, v in engine.stats.items() if k.startswith("finished_")) == len(reqs)
    assert_no_leaks(engine)
    assert engine.healthy() and engine._out_thread is None and engine._thread is None
    # stopped: the engine makes outputs inline again, and a restart gets a fresh output thread
    sp = SamplingParams(max_tokens=3, temperature=0)
    inline = engine.generate([ps[0]], sp)[0]
    assert inline.finish_reason == "length" and len(inline.output_ids) == 3
    cb, outs, done = _collect()
    cb.expected = 1
    engine.start()
    try:
        again = engine.submit(ps[0], sp, on_output=cb)
        assert done.wait(WAIT)
    finally:
        engine.stop()
    assert _summary(outs[again.request_id])["ids"] == inline.output_ids
    assert_no_leaks(engine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_output_thread_is_unhealthy_and_the_engine_goes_on_inline():
    engine = tiny_engine(tokenizer=char_tokenizer(), max_model_len=64)

    def fatal(out):
        if not fatal.raised:  # once: the outputs made inline afterwards must not end the engine thread
            fatal.raised = True
            raise SystemExit("a callback that kills its thread")

    fatal.raised = False

    sp = SamplingParams(max_tokens=4, temperature=0)
    engine.start()
    try:
        engine.submit(prompts([4], seed=1)[0], sp, on_output=fatal)
        for _ in range(WAIT * 10):
            if not engine._out_thread.is_alive():
                break
            threading.Event().wait(0.1)
        problem = engine.health(60)
        assert problem is not None and "output thread stopped" in problem and "SystemExit" in problem
        assert not engine.healthy()
        cb, outs, done = _collect()
        cb.expected = 1
        later = engine.submit(prompts([5], seed=2)[0], sp, on_output=cb)
        assert done.wait(WAIT)  # made inline by the engine thread now
    finally:
        engine.stop()
    s = _summary(outs[later.request_id])
    assert s["reason"] == "length" and len(s["ids"]) == 4
    assert_no_leaks(engine)
