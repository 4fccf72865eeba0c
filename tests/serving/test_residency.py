"""Issue 19 item 5: adapter residency. Ranks are bucketed (one rank-256 adapter does not pad the
rank-8 adapters' slots), loads are incremental (a load copies its own weights, not every table),
``max_cpu_loras`` bounds the adapters kept in host memory."""
from __future__ import annotations

import os

import torch

import fastadapters as fa
from fastadapters.serving import store as store_mod

from fastadapters.serving.sampling import SamplingParams

from .helpers import VOCAB, randomize_adapter, run_alone, tiny_llama
from .serve_helpers import one_thread, zoo  # noqa: F401 - fixtures

ATOL = 1e-5


def _ids(rows, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (rows, length), generator=g)


def _bytes_holding(store, name: str) -> int:
    """Device bytes of every stacked table that holds adapter ``name``."""
    return sum(t.down.nbytes + t.up.nbytes for lt in store.layers.values() for t in lt.tables() if name in t.members)


def _lora(model, name, r, seed):
    fa.patch(model, "lora", name=name, r=r, alpha=r, target_modules=["q_proj", "v_proj"])
    randomize_adapter(model, name, seed)


def test_rank_256_adapter_does_not_pad_rank_8_slots():
    model = tiny_llama()
    _lora(model, "a", 8, 1)
    _lora(model, "b", 8, 2)
    ids = _ids(4)
    with torch.no_grad(), fa.route(model, ["a", "b", None, "a"]) as router:
        model(ids)
    store = router.store
    before = _bytes_holding(store, "a")
    assert before > 0
    _lora(model, "big", 256, 3)
    names = ["a", "big", None, "b"]
    with torch.no_grad(), fa.route(model, names) as router:
        out = model(ids).logits
    assert router.store is store
    assert _bytes_holding(store, "a") == before  # the rank-8 tables did not grow to rank 256
    assert _bytes_holding(store, "big") > 0
    for i, n in enumerate(names):  # a mixed-rank batch: every row equals that row alone
        torch.testing.assert_close(out[i], run_alone(model, ids[i:i + 1], n)[0], atol=ATOL, rtol=0)


def test_mixed_rank_greedy_tokens_equal_each_alone():
    model = tiny_llama()
    for i, r in enumerate([1, 8, 9, 100, 256]):
        _lora(model, f"r{r}", r, 10 + i)
    names = ["r256", "r1", None, "r9", "r100", "r8"]
    ids = _ids(len(names), seed=3)
    with torch.no_grad(), fa.route(model, names) as router:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert set(router.store.buckets) == {1, 8, 16, 128, 256}
    for i, n in enumerate(names):
        fa.set_adapter(model, n)
        with torch.no_grad():
            alone = model.generate(ids[i:i + 1], max_new_tokens=5, do_sample=False)
        assert out[i].tolist() == alone[0].tolist(), n


def test_a_load_copies_its_own_weights_not_every_table():
    """Loading the k-th adapter copies that adapter's weights (and, when its bucket's tables are
    full, moves that bucket's slots once into tables twice the size); the other adapters' tables
    are neither reallocated nor refilled, so what a load costs does not grow with what is loaded."""
    model = tiny_llama()
    _lora(model, "big", 64, 0)
    ids = _ids(2)
    with torch.no_grad(), fa.route(model, ["big", None]) as router:
        model(ids)
    store = router.store
    big_tables = [t.down for lt in store.layers.values() for t in lt.tables() if "big" in t.members]
    own = None
    total_copied = total_own = 0
    for k in range(12):
        name = f"a{k}"
        _lora(model, name, 8, 100 + k)
        own = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n)
        copied, grown, swaps = store.bytes_copied, store.tables_grown, store.swaps
        with torch.no_grad(), fa.route(model, [name, "big"]):
            out = model(ids).logits
        copied = store.bytes_copied - copied
        grown = store.tables_grown - grown
        assert store.swaps - swaps == 1  # one slot filled: the new adapter's
        cap = store.capacity[8]
        if grown == 0:
            assert copied == own, (k, copied, own)
        else:  # a doubling: the bucket's own tables only, moved once
            assert cap & (cap - 1) == 0 and grown == sum(1 for lt in store.layers.values() for t in lt.tables()
                                                          if name in t.members)
        total_copied += copied
        total_own += own
        # the rank-64 adapter's tables are the same tensors: not rebuilt by any load
        assert [t.down for lt in store.layers.values() for t in lt.tables() if "big" in t.members] == big_tables
        assert all(a is b for a, b in zip(big_tables, [t.down for lt in store.layers.values() for t in lt.tables()
                                                        if "big" in t.members]))
        torch.testing.assert_close(out[0], run_alone(model, ids[:1], name)[0], atol=ATOL, rtol=0)
    assert total_copied <= 3 * total_own  # amortized O(1) per load
    torch.testing.assert_close(out[1], run_alone(model, ids[1:2], "big")[0], atol=ATOL, rtol=0)


def test_unload_frees_the_slot_and_the_next_load_reuses_it():
    model = tiny_llama()
    _lora(model, "a", 8, 1)
    _lora(model, "b", 8, 2)
    ids = _ids(2)
    with torch.no_grad(), fa.route(model, ["a", "b"]) as router:
        model(ids)
    store = router.store
    slot_b = store.slot_of["b"]
    fa.delete_adapter(model, "b")
    _lora(model, "c", 4, 3)  # bucket 4: a new table
    _lora(model, "d", 5, 4)  # bucket 8: b's old slot
    grown = store.tables_grown
    with torch.no_grad(), fa.route(model, ["d", "c"]):
        out = model(ids).logits
    assert store.slot_of["d"] == slot_b and "b" not in store.slot_of
    assert store.capacity[8] == 2 and store.tables_grown == grown + 4  # c: q and v of 2 layers; d: none
    for i, n in enumerate(["d", "c"]):
        torch.testing.assert_close(out[i], run_alone(model, ids[i:i + 1], n)[0], atol=ATOL, rtol=0)
    fa.delete_adapter(model, "c")
    with torch.no_grad(), fa.route(model, ["a", "d"]):
        model(ids)
    assert 4 not in store.buckets and store.tables_grown == grown + 4  # c's bucket freed, nothing rebuilt
    assert not any(4 in d for lt in store.layers.values() for d in (lt.pre, lt.post_in, lt.post_out))


def test_in_place_weight_edit_recopies_only_that_adapter():
    model = tiny_llama()
    _lora(model, "a", 8, 1)
    _lora(model, "b", 16, 2)
    ids = _ids(2)
    with torch.no_grad(), fa.route(model, ["a", "b"]) as router:
        model(ids)
    store = router.store
    swaps = store.swaps
    randomize_adapter(model, "b", 99)
    with torch.no_grad(), fa.route(model, ["a", "b"]):
        out = model(ids).logits
    assert store.swaps == swaps + 1
    for i, n in enumerate(["a", "b"]):
        torch.testing.assert_close(out[i], run_alone(model, ids[i:i + 1], n)[0], atol=ATOL, rtol=0)


def test_max_cpu_loras_drops_idle_adapters_and_reloads_them_on_demand(zoo, tmp_path):
    import shutil

    import pytest

    from fastadapters.serving.store import get_store

    from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine

    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="max_cpu_loras: got 1; valid: .* >= max_loras \\(2\\)"):
        tiny_engine(max_loras=2, max_cpu_loras=1)
    paths = {}
    for n in ("lora_r4", "lora_r64", "houlsby", "parallel", "prefix"):  # copies: one is deleted below
        paths[n] = shutil.copytree(zoo[n], tmp_path / n)
    engine = tiny_engine({n: str(p) for n, p in paths.items()}, max_num_seqs=4, max_loras=2, max_cpu_loras=2)
    ref = tiny_engine({n: zoo[n] for n in paths})
    routed = ["lora_r4", "lora_r64", "houlsby", "parallel"]

    def in_memory():
        internal = {e.internal: e.name for e in engine.adapters()}
        return sorted(internal[n] for n in fa.adapter_names(engine.model) if internal.get(n) in routed)

    assert in_memory() == ["houlsby", "parallel"]  # the two loaded last; the others were dropped
    assert len(get_store(engine.model).names) == 2  # the store holds no copy of the dropped ones
    assert engine.stats["adapters_dropped_from_memory"] == 2
    assert sorted(e.name for e in engine.adapters()) == sorted(paths)  # all still served
    names = routed + ["prefix", None, "lora_r4"]
    ps = prompts([3, 5, 4, 6, 2, 3, 4], seed=5)
    reqs = [engine.submit(p, greedy, adapter=n) for p, n in zip(ps, names)]
    engine.run_until_done()
    for n, p, r in zip(names, ps, reqs):
        assert r.finish_reason == "length" and r.output_ids == greedy_ref(ref, n, p, 4), n
    assert engine.stats["adapters_reloaded"] == 2
    assert len(in_memory()) == 2 and len(get_store(engine.model).names) == 2  # the bound holds again, idle
    assert_no_leaks(engine)
    # a dropped adapter whose file went away: its request fails alone, with the reason; others run
    dropped = next(n for n in routed if n not in in_memory())
    shutil.rmtree(paths[dropped])
    bad = engine.submit(ps[0], greedy, adapter=dropped)
    good = engine.submit(ps[1], greedy, adapter=None)
    engine.run_until_done()
    assert bad.finish_reason == "error" and good.finish_reason == "length"
    assert engine.stats["request_errors"] >= 1
    assert_no_leaks(engine)


def test_a_reload_after_a_drop_never_hits_blocks_cached_with_the_weights_before(tmp_path):
    """max_cpu_loras drops an idle adapter and reloads it from its files under the same internal
    name. Its prompt's blocks cached before the drop were keyed by that name alone, so when the
    files had changed, the reloaded adapter's request read keys/values of the old weights for its
    cached prefix and the new weights for the rest: tokens of neither adapter."""
    from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine

    def write_lora(seed: int) -> str:
        model = tiny_llama()
        fa.patch(model, "lora", name="x", r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
        randomize_adapter(model, "x", seed)
        return fa.save_adapter(model, str(tmp_path / f"lora_{seed}"), name="x")

    import shutil

    path = str(tmp_path / "a")
    shutil.copytree(write_lora(1), path)
    engine = tiny_engine({"a": path}, max_num_seqs=2, block_size=4, max_cpu_loras=1)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    p = prompts([21], seed=3)[0]
    first = engine.generate([p], greedy, ["a"])[0]
    assert engine.pool.cached_blocks >= 5  # its prompt's blocks stay cached
    engine.load_adapter("b", write_lora(2), confined=False)
    assert engine.stats["adapters_dropped_from_memory"] == 1  # "a" (idle) went
    shutil.rmtree(path)
    shutil.copytree(write_lora(77), path)  # its files replaced with other weights
    again = engine.generate([p], greedy, ["a"])[0]
    assert engine.stats["adapters_reloaded"] == 1
    expected = greedy_ref(engine, "a", p, greedy.max_tokens)  # the reloaded weights, alone
    assert expected != first.output_ids  # (the new weights do change the tokens)
    assert again.output_ids == expected
    assert engine.stats["prefix_cache_hit_tokens"] == 0
    again = engine.generate([p], greedy, ["a"])[0]  # the reloaded version caches and hits its own blocks
    assert engine.stats["prefix_cache_hit_tokens"] == 20 and again.output_ids == expected
    assert_no_leaks(engine)


def test_engine_load_between_steps_copies_only_the_new_adapter(zoo, monkeypatch):
    """Loads while a request runs: each step after a load copies that adapter's weights (its
    bucket's tables doubling at most once per power of two) and reads no other adapter's weights'
    version counters, so the stall a load adds does not grow with how many are loaded."""
    from fastadapters.serving.store import AdapterStore, get_store

    from .serve_helpers import greedy_ref, prompts, tiny_engine

    engine = tiny_engine({"big": zoo["lora_r64"]}, max_num_seqs=2)
    ref = tiny_engine({"big": zoo["lora_r64"]})
    p = prompts([4], seed=9)[0]
    long = engine.submit(p, SamplingParams(max_tokens=20, temperature=0.0), adapter="big")
    engine.step()
    engine.step()
    store = get_store(engine.model)
    full_walks = []
    real = AdapterStore._weight_versions
    monkeypatch.setattr(AdapterStore, "_weight_versions",
                        lambda self, names=None: full_walks.append(names) or real(self, names))
    for k in range(6):
        entry = engine.load_adapter(f"a{k}", zoo["lora_r4"], confined=False)
        own = sum(t.numel() * t.element_size() for n, t in engine.model.named_parameters() if f".{entry.internal}." in n)
        copied, grown = store.bytes_copied, store.tables_grown
        engine.step()
        copied, grown = store.bytes_copied - copied, store.tables_grown - grown
        if grown == 0:
            assert copied == own, (k, copied, own)
        else:
            assert store.capacity[4] in (1, 2, 4, 8) and copied <= own * store.capacity[4]  # created or doubled
        assert None not in full_walks  # no walk of every adapter's weights
    engine.run_until_done()
    assert long.output_ids == greedy_ref(ref, "big", p, 20)


def test_adapter_files_are_read_outside_the_engine_thread(zoo, monkeypatch):
    """A runtime load and a max_cpu_loras reload read the files in the caller's thread; the engine
    thread only patches and copies between steps."""
    import threading
    import time

    import fastadapters.io as fio

    from .serve_helpers import greedy_ref, prompts, tiny_engine

    ref = tiny_engine({"a": zoo["lora_r4"], "b": zoo["houlsby"]})
    readers = []
    real = fio.read_adapter
    monkeypatch.setattr(fio, "read_adapter", lambda path: readers.append(threading.current_thread().name)
                        or real(path))
    engine = tiny_engine(max_num_seqs=2, max_loras=1, max_cpu_loras=1)
    engine.start()
    try:
        engine.load_adapter("a", zoo["lora_r4"], confined=False)
        engine.load_adapter("b", zoo["houlsby"], confined=False)  # drops "a" from memory
        assert engine.call(lambda: engine.registry.entries["a"].metadata.get("evicted")) is True
        p = prompts([5], seed=2)[0]
        req = engine.submit(p, SamplingParams(max_tokens=3, temperature=0.0), adapter="a")  # a reload
        deadline = time.monotonic() + 60
        while req.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert req.finish_reason == "length" and req.output_ids == greedy_ref(ref, "a", p, 3)
    assert engine.stats["adapters_reloaded"] == 1
    assert len(readers) == 3 and "fastadapters-engine" not in readers, readers


def test_a_runtime_loaded_adapter_is_reloaded_through_the_root_checks(zoo, tmp_path):
    """An adapter loaded under an --adapter-root and dropped by max_cpu_loras is read again through
    the same checks as its first load: a weights file that now links outside the root is refused
    (its request ends alone with the reason), never read."""
    import shutil

    from .serve_helpers import assert_no_leaks, prompts, tiny_engine

    root, outside = tmp_path / "root", tmp_path / "outside"
    for n in ("lora_r4", "lora_r64"):
        shutil.copytree(zoo[n], root / n)
    shutil.copytree(zoo["lora_r4"], outside)
    engine = tiny_engine(max_num_seqs=2, max_loras=1, max_cpu_loras=1, adapter_roots=[str(root)])
    engine.load_adapter("a", "lora_r4")  # relative: under the root
    engine.load_adapter("b", "lora_r64")  # "a" is dropped from memory
    assert engine.stats["adapters_dropped_from_memory"] == 1
    assert {e.name: e.path for e in engine.adapters()} == {"a": "lora_r4", "b": "lora_r64"}
    weights = next(f for f in os.listdir(root / "lora_r4") if f.endswith(".safetensors"))
    os.remove(root / "lora_r4" / weights)
    (root / "lora_r4" / weights).symlink_to(outside / weights)
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    outs = []
    bad = engine.submit(prompts([3], seed=1)[0], greedy, adapter="a", on_output=outs.append)
    engine.run_until_done()
    assert bad.finish_reason == "error"
    assert "links outside the adapter roots" in outs[-1].error and str(outside) not in outs[-1].error
    assert_no_leaks(engine)
