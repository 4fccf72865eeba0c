"""Host work per engine step (issue 19 item 2), counted, not timed.

- Python calls in a decode step do not grow with the number of loaded adapters (the store is
  checked by its version counter, not by walking every adapter parameter);
- the router is built once: requests joining and leaving repack it in place.
"""
from __future__ import annotations

import sys

from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures

GREEDY = SamplingParams(max_tokens=6, temperature=0)


def _calls_in_one_decode_step(engine) -> int:
    count = [0]

    def prof(frame, event, arg):
        if event == "call":
            count[0] += 1

    sys.setprofile(prof)
    try:
        engine.step()
    finally:
        sys.setprofile(None)
    return count[0]


def _decode_calls(zoo, n_adapters: int) -> int:
    engine = tiny_engine(max_num_seqs=4)
    for i in range(n_adapters):
        engine.load_adapter(f"a{i}", zoo["lora_r64"] if i % 2 else zoo["houlsby"], confined=False)
    ps = prompts([5, 7, 4], seed=5)
    for p, name in zip(ps, ["a0", None, "a1" if n_adapters > 1 else "a0"]):
        engine.submit(p, SamplingParams(max_tokens=8, temperature=0), adapter=name)
    for _ in range(3):  # prefill, then decode steps (the first routed step builds the store)
        engine.step()
    calls = min(_calls_in_one_decode_step(engine) for _ in range(2))
    engine.run_until_done()
    return calls


def test_python_calls_per_step_do_not_grow_with_loaded_adapters(zoo):
    two, sixteen = _decode_calls(zoo, 2), _decode_calls(zoo, 16)
    assert sixteen <= two * 1.02 + 20, (two, sixteen)


def test_router_is_built_once_while_requests_join_and_leave(zoo, monkeypatch):
    import fastadapters.serving.routing as routing

    built = []
    real_init = routing.Router.__init__

    def counting(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(routing.Router, "__init__", counting)
    engine = tiny_engine(zoo, max_num_seqs=3, chunk_size=4, token_budget=8)
    names = ["lora_r4", None, "houlsby", "lora_r64", "parallel", "lora_r4", "pfeiffer"]
    ps = prompts([9, 3, 6, 2, 11, 5, 7], seed=6)
    lens = [3, 6, 2, 5, 4, 7, 3]
    reqs = engine.generate(ps, [SamplingParams(max_tokens=n, temperature=0) for n in lens], names)
    assert len(built) == 1  # 7 requests of 5 adapters joined and left over the steps: one router
    assert engine._router.repacks > 5
    for name, p, n, r in zip(names, ps, lens, reqs):
        assert r.output_ids == greedy_ref(engine, name, p, n), name
    assert_no_leaks(engine)


def test_max_loras_limits_resident_adapters_and_keeps_tokens(zoo):
    engine = tiny_engine(zoo, max_num_seqs=6, max_loras=2)
    names = ["lora_r4", "houlsby", "lora_r64", "parallel", None, "lora_r4", "pfeiffer", "prefix"]
    ps = prompts([4, 6, 3, 8, 5, 2, 7, 3], seed=12)
    reqs = [engine.submit(p, GREEDY, adapter=n) for p, n in zip(ps, names)]
    seen = 0
    while engine.step():
        running = {r.route_name for r in engine.scheduler.running if r.route_name is not None}
        assert len(running) <= 2
        seen = max(seen, len(running))
    from fastadapters.serving.store import get_store

    assert seen == 2 and get_store(engine.model).num_slots == 2 and get_store(engine.model).swaps > 2
    for name, p, r in zip(names, ps, reqs):
        assert r.output_ids == greedy_ref(engine, name, p, GREEDY.max_tokens), name
    assert_no_leaks(engine)


def test_a_request_on_a_non_resident_adapter_is_not_starved_by_a_stream_on_resident_ones(zoo):
    """max_loras=1: a request on adapter B waits while A holds the only slot and later A requests
    are admitted past it, but after ``max_num_seqs`` of them nothing more overtakes it: it runs
    once the A requests admitted before that point finish, however many A requests keep arriving."""
    engine = tiny_engine(zoo, max_num_seqs=2, max_loras=1)
    sp = SamplingParams(max_tokens=3, temperature=0)
    p = prompts([4], seed=3)[0]
    engine.submit(p, sp, adapter="lora_r4")
    engine.step()  # A holds the slot
    starving = engine.submit(p, sp, adapter="houlsby")
    admitted_a_before_b = 0
    for step in range(60):  # a steady stream on A: one new request every step
        engine.submit(p, sp, adapter="lora_r4")
        engine.step()
        if starving.status.value != "waiting":
            break
        admitted_a_before_b = sum(1 for r in engine.scheduler.running if r.adapter == "lora_r4")
    else:
        raise AssertionError("the request on the non-resident adapter never ran")
    assert starving.metadata.get("overtaken", 0) == engine.scheduler.max_num_seqs
    assert step < 20 and admitted_a_before_b <= 2
    engine.run_until_done()
    assert starving.output_ids == greedy_ref(engine, "houlsby", p, sp.max_tokens)
    assert_no_leaks(engine)
