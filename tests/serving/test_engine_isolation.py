"""One request's numbers never reach another's (issue 19 item 6, issue 17's engine half).

- an adapter whose weights turn NaN after loading (bypassing any load-time check) ends its own
  request with finish_reason "error" and a message; the base, LoRA, series and prefix requests
  batched beside it keep exactly their greedy tokens alone; nothing leaks and the engine steps on;
- a temperature below 1e-5 is greedy (``1e-300`` used to raise inside the step and hang);
- NaN logits at a temperature > 0 end that request alone.
"""
from __future__ import annotations

import torch

from fastadapters.patching import _wrappers
from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures

GREEDY = SamplingParams(max_tokens=6, temperature=0)


def _poison(engine, name: str) -> None:
    internal = engine.registry.entries[name].internal
    with torch.no_grad():
        for _, w in _wrappers(engine.model):
            for container in (w.lora_B, w.adapter_up):
                if internal in container:
                    container[internal].weight.fill_(float("nan"))


def test_nan_adapter_ends_its_request_alone_and_others_keep_their_tokens(zoo):
    engine = tiny_engine(zoo, max_num_seqs=8, block_size=4, chunk_size=4, token_budget=16)
    engine.load_adapter("bad", zoo["lora_r4"], confined=False)
    names = [None, "lora_r64", "bad", "houlsby", "prefix", "parallel", "bad"]
    ps = prompts([5, 9, 7, 3, 11, 6, 2], seed=21)
    want = {i: greedy_ref(engine, n, p, GREEDY.max_tokens) for i, (n, p) in enumerate(zip(names, ps)) if n != "bad"}
    _poison(engine, "bad")
    outs = {}
    reqs = [engine.submit(p, GREEDY, adapter=n, on_output=lambda o: outs.setdefault(o.request_id, []).append(o))
            for p, n in zip(ps, names)]
    engine.run_until_done()
    for i, (name, req) in enumerate(zip(names, reqs)):
        if name == "bad":
            assert req.finish_reason == "error"
            last = outs[req.request_id][-1]
            assert last.finished and last.finish_reason == "error" and "non-finite" in last.error
        else:
            assert req.finish_reason == "length" and req.output_ids == want[i], name
    assert engine.stats["request_errors"] == 2
    assert_no_leaks(engine)
    # the engine keeps serving afterwards
    again = engine.generate([ps[0]], GREEDY)[0]
    assert again.output_ids == want[0]


def test_tiny_temperature_is_greedy_and_finishes(zoo):
    engine = tiny_engine(max_num_seqs=2)
    p = prompts([6], seed=3)[0]
    req = engine.generate([p], SamplingParams(max_tokens=4, temperature=1e-300))[0]
    assert req.finish_reason == "length" and req.output_ids == greedy_ref(engine, None, p, 4)
    assert req.generator is None
    assert_no_leaks(engine)


def test_nan_logits_at_temperature_end_that_row_only():
    from fastadapters.serving.sampling import sample_rows

    logits = torch.randn(3, 11)
    logits[1, 4] = float("nan")
    ps = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.8, seed=2), SamplingParams(temperature=0)]
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]
    tokens, errors = sample_rows(logits, ps, gens)
    assert errors[0] is None and errors[2] is None and "non-finite" in errors[1]
    assert tokens[2] == int(logits[2].argmax())
    assert 0 <= tokens[0] < 11


def test_a_failure_after_sampling_ends_only_that_request(zoo):
    """A request whose post-processing raises (here its tokenizer) ends with an error; the others finish."""
    from .char_tokenizer import char_tokenizer

    bad_token = []

    class Fragile:
        def __init__(self, tok):
            self.tok = tok

        def decode(self, ids, **kw):
            if bad_token and bad_token[0] in ids:
                raise ValueError(f"cannot decode token {bad_token[0]}")
            return self.tok.decode(ids, **kw)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    engine = tiny_engine(tokenizer=Fragile(char_tokenizer()), max_num_seqs=4)
    ps = prompts([5, 6, 7], seed=40)
    sp = SamplingParams(max_tokens=12, temperature=0)
    want = [greedy_ref(engine, None, p, 12) for p in ps]
    only_first = [t for t in want[0] if t not in want[1] and t not in want[2]]
    assert only_first, "pick prompts whose outputs differ"
    bad_token.append(only_first[0])
    reqs = [engine.submit(p, sp) for p in ps]
    engine.run_until_done()
    assert reqs[0].finish_reason == "error" and reqs[0].output_ids[-1] == bad_token[0]
    assert [r.output_ids for r in reqs[1:]] == want[1:] and all(r.finish_reason == "length" for r in reqs[1:])
    assert_no_leaks(engine)


def test_a_non_finite_row_never_reaches_the_draw_and_an_all_minus_inf_row_is_an_error(monkeypatch):
    from fastadapters.serving import sampling

    real = sampling._draw

    def checked(x, params, generator):
        assert torch.isfinite(x).all(), "a non-finite row reached the draw"
        return real(x, params, generator)

    monkeypatch.setattr(sampling, "_draw", checked)
    logits = torch.randn(4, 9)
    logits[0, 2] = float("nan")
    logits[1, 5] = float("inf")
    logits[2] = float("-inf")
    ps = [SamplingParams(temperature=0.7, seed=s) for s in range(3)] + [SamplingParams(temperature=0)]
    gens = [torch.Generator().manual_seed(s) for s in range(3)] + [None]
    tokens, errors = sampling.sample_rows(logits, ps, gens)
    assert all("non-finite" in e for e in errors[:2]) and "every logit is -inf" in errors[2] and errors[3] is None
    assert tokens[3] == int(logits[3].argmax())
    _, errors = sampling.sample_rows(logits[2:3], [SamplingParams(temperature=0)], [None])
    assert errors[0] is not None  # greedy over all -inf would silently answer token 0


def test_a_step_that_fails_after_the_forward_ends_its_requests_and_leaks_nothing(monkeypatch):
    """A failure between the forward and the tokens (e.g. a device error surfacing at the one host
    copy) must not leave requests advanced with no token: they would never be scheduled again."""
    import pytest

    from fastadapters.serving import engine as engine_mod

    engine = tiny_engine(max_num_seqs=4)
    ps = prompts([5, 6], seed=41)
    reqs = [engine.submit(p, GREEDY) for p in ps]
    calls = []
    real = engine_mod.sample_rows

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device error at the host copy")
        return real(*a, **k)

    monkeypatch.setattr(engine_mod, "sample_rows", failing)
    engine.step()
    with pytest.raises(RuntimeError, match="device error"):
        engine.step()
    assert all(r.finish_reason == "error" for r in reqs)
    assert not engine.scheduler.has_work() and not engine.requests
    assert_no_leaks(engine)
    after = engine.submit(ps[0], GREEDY)  # the engine serves on
    engine.run_until_done()
    assert after.finish_reason == "length" and after.output_ids == greedy_ref(engine, None, ps[0], GREEDY.max_tokens)


def test_a_command_that_timed_out_is_withdrawn_and_never_runs_later(zoo):
    """A load the engine thread did not reach in time answers EngineBusy (HTTP 503) and is withdrawn:
    the adapter must not appear after the client was told it failed."""
    import threading

    import pytest

    from fastadapters.serving.engine import EngineBusy

    engine = tiny_engine(zoo, max_num_seqs=2)
    gate = threading.Event()
    real_step = engine.step

    def slow_step():  # the engine thread is busy until the gate opens
        gate.wait(10)
        return real_step()

    engine.step = slow_step
    engine.start()
    try:
        engine.submit(prompts([4], seed=2)[0], GREEDY)
        with pytest.raises(EngineBusy, match="nothing was changed"):
            engine.load_adapter("late", zoo["lora_r4"], confined=False, timeout=0.2)
        gate.set()
        engine.call(lambda: None, timeout=30)  # every queued command has been taken by now
        assert "late" not in {e.name for e in engine.adapters()}
    finally:
        gate.set()
        engine.stop()
