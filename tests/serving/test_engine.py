"""The serving engine (fastadapters.serving.engine): continuous batching of mixed-adapter requests.

Greedy output of every request, batched with others of every adapter type (LoRA ranks 4 and 64,
series Houlsby / Pfeiffer, parallel, prefix, base rows), prompts of odd lengths, prefill chunked
across steps while others decode, KV blocks smaller than a prompt, must equal the model run alone
with that adapter (fp32). Then: preemption when blocks run out, cancellation, seeded sampling,
bad input, runtime reload, and that nothing leaks.
"""
from __future__ import annotations

import pytest

import fastadapters as fa
from fastadapters.serving.engine import AdapterError, PromptError, QueueFull, UnknownAdapter
from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import ZOO_NAMES, assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)

GREEDY = SamplingParams(max_tokens=7, temperature=0)


def _mixed(n_each: int = 1):
    names = [None] + ZOO_NAMES
    names = names * n_each
    ps = prompts([1, 5, 13, 9, 7, 3, 17, 2, 11, 4, 6, 8, 10, 12][:len(names)], seed=len(names))
    return names, ps


def test_greedy_equals_generate_alone_every_adapter_type(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4, chunk_size=4, token_budget=8)
    names, ps = _mixed(2)
    reqs = engine.generate(ps, GREEDY, names)
    for name, p, req in zip(names, ps, reqs):
        assert req.finish_reason == "length" and len(req.output_ids) == GREEDY.max_tokens
        assert req.output_ids == greedy_ref(engine, name, p, GREEDY.max_tokens), (name, len(p))
    # the adapters change the outputs (two of seven may coincide on a tiny random model)
    assert len({tuple(r.output_ids) for r in reqs[:7]}) >= 5
    assert engine.stats["steps"] > GREEDY.max_tokens  # requests joined and left over several steps
    assert_no_leaks(engine)


def test_preemption_when_blocks_run_out_keeps_outputs(zoo):
    engine = tiny_engine(zoo, max_num_seqs=6, block_size=4, num_blocks=8, max_model_len=32)
    names, ps = _mixed(1)
    reqs = [engine.submit(p, GREEDY, adapter=n) for p, n in zip(ps, names)]
    while engine.step():  # invariants after every step: waiting requests hold no blocks, none is shared
        assert all(not r.blocks for r in engine.scheduler.waiting)
        held = [b for r in engine.scheduler.running for b in r.blocks]
        assert len(held) == len(set(held)) == engine.pool.used_blocks
    assert sum(r.preemptions for r in reqs) > 0
    for name, p, req in zip(names, ps, reqs):
        assert req.output_ids == greedy_ref(engine, name, p, GREEDY.max_tokens), name
    assert_no_leaks(engine)


def test_abort_frees_blocks_and_others_continue(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4)
    outs = []
    ps = prompts([6, 9], seed=3)
    a = engine.submit(ps[0], SamplingParams(max_tokens=20, temperature=0), adapter="houlsby", on_output=outs.append)
    b = engine.submit(ps[1], GREEDY, adapter="prefix")
    engine.step()
    engine.step()
    assert engine.pool.used_blocks > 0
    engine.abort(a.request_id)
    engine.run_until_done()
    assert a.finish_reason == "abort" and outs[-1].finished and outs[-1].finish_reason == "abort"
    assert b.output_ids == greedy_ref(engine, "prefix", ps[1], GREEDY.max_tokens)
    assert_no_leaks(engine)


def test_seeded_sampling_reproduces_whatever_is_batched(zoo):
    sp = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, top_k=20, seed=1234)
    p = prompts([5], seed=9)[0]
    alone = tiny_engine(zoo).generate([p], sp, ["lora_r64"])[0].output_ids
    engine = tiny_engine(zoo, max_num_seqs=8)
    names, ps = _mixed(1)
    mixed = engine.generate([p] + ps, [sp] + [GREEDY] * len(ps), ["lora_r64"] + names)
    assert mixed[0].output_ids == alone
    seeds = [tiny_engine(zoo).generate([p], SamplingParams(max_tokens=6, temperature=0.9, seed=s), ["lora_r64"])[0]
             .output_ids for s in (1, 2, 3)]
    assert len({tuple(o) for o in seeds + [alone]}) > 1  # the seed matters: it samples


def test_bad_requests_are_refused_and_change_nothing(zoo):
    engine = tiny_engine(zoo, max_model_len=16, max_num_seqs=1)
    before = engine.snapshot()
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([3, 4], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([3, 4], SamplingParams(top_p=0))
    with pytest.raises(PromptError, match="max_model_len"):
        engine.submit(list(range(3, 19)), GREEDY)
    with pytest.raises(PromptError, match="prefix"):  # 3 prefix positions + 13 tokens fill the context
        engine.submit(list(range(3, 16)), GREEDY, adapter="prefix")
    with pytest.raises(PromptError, match="out of range"):
        engine.submit([3, 64], GREEDY)
    with pytest.raises(PromptError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(UnknownAdapter, match="nope"):
        engine.submit([3], GREEDY, adapter="nope")
    assert engine.snapshot() == before


def test_queue_full_is_refused_at_once(zoo):
    engine = tiny_engine(max_num_seqs=1, max_waiting=2)
    for _ in range(2):
        engine.submit([3, 4], GREEDY)
    with pytest.raises(QueueFull, match="retry"):
        engine.submit([3, 4], GREEDY)
    engine.run_until_done()
    assert_no_leaks(engine)


def test_runtime_load_unload_reload_and_confinement(zoo, tmp_path):
    import shutil

    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(zoo["lora_r4"], root / "a")
    shutil.copytree(zoo["houlsby"], root / "b")
    (root / "escape").symlink_to(zoo["parallel"])  # a link out of the root
    engine = tiny_engine(adapter_roots=[str(root)], max_num_seqs=4)
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        engine.load_adapter("x", str(root / "escape"))
    with pytest.raises(AdapterError, match="outside the adapter roots"):
        engine.load_adapter("x", str(root / ".." / "elsewhere"))
    with pytest.raises(AdapterError, match="could not load|no adapter"):
        engine.load_adapter("x", str(root))  # no adapter files there
    assert fa.adapter_names(engine.model) == [] and engine.adapters() == []
    p = prompts([6], seed=5)[0]
    engine.load_adapter("x", str(root / "a"))
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("x", str(root / "b"))
    first = engine.generate([p], GREEDY, ["x"])[0].output_ids
    assert first == greedy_ref(engine, "x", p, GREEDY.max_tokens)
    # unload while a request on "x" runs: it finishes on the old weights; new requests are refused
    running = engine.submit(p, GREEDY, adapter="x")
    engine.step()
    engine.unload_adapter("x")
    with pytest.raises(UnknownAdapter):
        engine.submit(p, GREEDY, adapter="x")
    engine.load_adapter("x", str(root / "b"))  # a reload under the same name: the new weights
    fresh = engine.submit(p, GREEDY, adapter="x")
    engine.run_until_done()
    assert running.output_ids == first
    assert fresh.output_ids == greedy_ref(engine, "x", p, GREEDY.max_tokens) != first
    assert len(fa.adapter_names(engine.model)) == 1  # the old version is gone once its request ended
    engine.unload_adapter("x")
    assert fa.adapter_names(engine.model) == []
    assert_no_leaks(engine)


def test_stop_text_is_held_back_until_it_cannot_be_a_stop():
    from fastadapters.serving.engine import Engine

    assert Engine._stable_prefix("hello wor", ["world"]) == "hello "
    assert Engine._stable_prefix("hello", ["xyz"]) == "hello"
    assert Engine._stable_prefix("caf\ufffd", []) == "caf"


def test_background_thread_serves_and_stops(zoo):
    import threading

    engine = tiny_engine(zoo, max_num_seqs=3)
    engine.start()
    try:
        done = threading.Event()
        got = []
        names, ps = _mixed(1)

        def cb(out):
            if out.finished:
                got.append(out)
                if len(got) == len(ps):
                    done.set()

        reqs = [engine.submit(p, GREEDY, adapter=n, on_output=cb) for p, n in zip(ps, names)]
        assert done.wait(60)
        engine.load_adapter("again", zoo["parallel"], confined=False)  # runs in the engine thread
    finally:
        engine.stop()
    for name, p, req in zip(names, ps, reqs):
        assert req.output_ids == greedy_ref(engine, name, p, GREEDY.max_tokens), name
    assert_no_leaks(engine)


def test_kv_memory_budget_sizes_the_pool(zoo):
    # tiny llama: 2 layers x 2 kv heads x head_dim 8 x 4 bytes x (K and V) = 256 bytes per position
    full = tiny_engine(max_num_seqs=4, max_model_len=64, block_size=4)
    assert full.pool.num_blocks == 4 * 16  # every sequence at full length fits the default budget
    small = tiny_engine(max_num_seqs=4, max_model_len=64, block_size=4, kv_cache_bytes=20 * 4 * 256)
    assert small.pool.num_blocks == 20
    floor = tiny_engine(max_num_seqs=4, max_model_len=64, block_size=4, kv_cache_bytes=1)
    assert floor.pool.num_blocks == 16  # never below one full-length request
    names, ps = _mixed(1)
    reqs = small.generate(ps, GREEDY, names[:1] * len(ps))
    assert all(len(r.output_ids) == GREEDY.max_tokens for r in reqs)
    assert_no_leaks(small)


def test_base_only_batches_skip_routing_and_stay_correct(zoo, monkeypatch):
    import fastadapters.serving.routing as routing

    engine = tiny_engine(zoo, max_num_seqs=4)
    ps = prompts([3, 8, 5], seed=11)
    want = [greedy_ref(engine, None, p, GREEDY.max_tokens) for p in ps]
    fa.set_adapter(engine.model, None)
    calls = []
    real = routing.route
    monkeypatch.setattr(routing, "route", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert [r.output_ids for r in engine.generate(ps, GREEDY, [None, "prefix", None])][::2] == want[::2]
    assert calls == []  # base and prefix rows only: no routing set-up at all
    fa.set_adapter(engine.model, engine.registry.entries["houlsby"].internal)  # someone activated an adapter
    assert [r.output_ids for r in engine.generate(ps, GREEDY)] == want  # routed: base rows stay base
    assert calls


def test_triton_backend_gives_the_same_tokens(zoo):
    # the Triton multi-adapter kernels (interpreted on the CPU, see conftest.py) through the engine
    names = ["lora_r4", "houlsby", None, "parallel"]
    ps = prompts([5, 3, 4, 6], seed=13)
    sp = SamplingParams(max_tokens=3, temperature=0)
    want = [r.output_ids for r in tiny_engine(zoo, backend="torch").generate(ps, sp, names)]
    got = [r.output_ids for r in tiny_engine(zoo, backend="triton").generate(ps, sp, names)]
    assert got == want


def test_eager_configured_model_gives_the_same_tokens(zoo):
    # the engine's forward runs its own paged attention whatever the model was configured with, and
    # restores the configured implementation afterwards
    from fastadapters.serving.engine import Engine
    from .helpers import tiny_llama

    names, ps = _mixed(1)
    sdpa = tiny_engine(zoo)
    assert sdpa.model.config._attn_implementation == "sdpa"
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    eager = Engine(model, backend="torch")
    for name, path in zoo.items():
        eager.load_adapter(name, path, confined=False)
    want = [r.output_ids for r in sdpa.generate(ps, GREEDY, names)]
    assert [r.output_ids for r in eager.generate(ps, GREEDY, names)] == want
    assert model.config._attn_implementation == "eager" and sdpa.model.config._attn_implementation == "sdpa"
