"""Prefix cache (issue 19 item 4): full blocks named by (adapter load id, tokens) are shared.

- a request whose prompt starts like an earlier one's (same adapter) reuses its blocks and
  computes only the rest, with the same greedy tokens as alone; another adapter never reuses them;
- a prefix-tuning adapter's prefix keys/values sit in blocks shared by its requests;
- cached blocks count as free and are evicted when the pool needs them; nothing leaks.
"""
from __future__ import annotations

from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures

GREEDY = SamplingParams(max_tokens=5, temperature=0)


def test_shared_prompt_prefix_is_computed_once_per_adapter(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=4)
    base = prompts([21], seed=30)[0]
    other = base[:13] + prompts([6], seed=31)[0]  # first 3 blocks (12 tokens) equal
    first = engine.generate([base], GREEDY, ["lora_r4"])[0]
    assert engine.stats["prefix_cache_hit_tokens"] == 0
    again = engine.generate([base], GREEDY, ["lora_r4"])[0]
    assert engine.stats["prefix_cache_hit_tokens"] == 20  # 5 full blocks; the last token is recomputed
    assert again.output_ids == first.output_ids == greedy_ref(engine, "lora_r4", base, GREEDY.max_tokens)
    part = engine.generate([other], GREEDY, ["lora_r4"])[0]
    assert engine.stats["prefix_cache_hit_tokens"] == 32
    assert part.output_ids == greedy_ref(engine, "lora_r4", other, GREEDY.max_tokens)
    hits = engine.stats["prefix_cache_hit_tokens"]
    elsewhere = engine.generate([base, base], GREEDY, ["houlsby", None])
    assert engine.stats["prefix_cache_hit_tokens"] == hits  # other adapters: other keys/values
    assert elsewhere[0].output_ids == greedy_ref(engine, "houlsby", base, GREEDY.max_tokens)
    assert elsewhere[1].output_ids == greedy_ref(engine, None, base, GREEDY.max_tokens)
    assert_no_leaks(engine)


def test_prefix_adapter_prefix_blocks_are_shared(zoo):
    engine = tiny_engine(zoo, max_num_seqs=4, block_size=3)  # the zoo's prefix has 3 positions: one block
    ps = prompts([5, 8], seed=33)
    a = engine.submit(ps[0], GREEDY, adapter="prefix")
    engine.step()
    b = engine.submit(ps[1], GREEDY, adapter="prefix")
    engine.step()
    assert a.blocks[0] == b.blocks[0] and engine.pool._refs[a.blocks[0]] == 2
    engine.run_until_done()
    for p, r in zip(ps, (a, b)):
        assert r.output_ids == greedy_ref(engine, "prefix", p, GREEDY.max_tokens)
    assert_no_leaks(engine)


def test_cached_blocks_are_evicted_when_needed(zoo):
    engine = tiny_engine(max_num_seqs=2, block_size=4, num_blocks=16, max_model_len=64)
    ps = prompts([30, 29, 31, 28], seed=34)
    for p in ps:  # each leaves ~8 cached blocks behind; the pool holds 16
        r = engine.generate([p], GREEDY)[0]
        assert r.output_ids == greedy_ref(engine, None, p, GREEDY.max_tokens)
        assert engine.pool.free_blocks == 16
    assert 0 < engine.pool.cached_blocks <= 16
    assert_no_leaks(engine)
    off = tiny_engine(max_num_seqs=2, block_size=4, prefix_caching=False)
    off.generate([ps[0], ps[0]], GREEDY)
    assert off.stats["prefix_cache_hit_tokens"] == 0 and off.pool.cached_blocks == 0


def test_block_keys_are_content_digests_not_python_hash(monkeypatch):
    """A cached block is trusted on its key alone, so the key must not be collidable on purpose:
    Python's hash of an int tuple has no per-process seed and 64 bits. Here every hash() collides;
    blocks with other tokens, scope, index or parent must still get other keys."""
    import builtins
    import hashlib

    from fastadapters.serving.scheduler import Request

    engine = tiny_engine(max_num_seqs=2, block_size=4)
    sched = engine.scheduler
    monkeypatch.setattr(builtins, "hash", lambda x: 7)  # a collision for every content, were hash used
    a = Request([5, 6, 7, 8, 9, 10, 11, 12], GREEDY)
    b = Request([5, 6, 7, 9, 9, 10, 11, 12], GREEDY)
    ka0 = sched._block_key(a, 0, None)
    assert len(ka0) == hashlib.sha256().digest_size
    assert ka0 == sched._block_key(Request(list(a.prompt_ids), GREEDY), 0, None)  # same content, same key
    assert ka0 != sched._block_key(b, 0, None)
    assert sched._block_key(a, 1, ka0) != sched._block_key(a, 1, sched._block_key(b, 0, None))
    scoped = Request(list(a.prompt_ids), GREEDY)
    scoped.cache_scope = "_adapter_1"
    assert sched._block_key(scoped, 0, None) != ka0
