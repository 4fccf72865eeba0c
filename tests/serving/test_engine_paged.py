"""The engine's attention reads each request's own blocks (issue 19, item 1), counted, not timed.

- score elements computed by attention equal those needed (sum over requests of heads x new
  tokens x own context), whatever else is batched (the packed path computed B times more), when
  every request attends on its own (``decode_batch_max_len=0``); with the default, short-context
  decode rows share one SDPA padded to the longest of them (at most ``DECODE_BATCH_MAX_LEN``
  positions), and a long request's scores and copies stay its own;
- no transformers ``DynamicCache`` and no ``repeat_kv`` in an engine step: new keys/values go
  straight into the block pool;
- nothing is copied out of the pool for a request whose blocks are one run; a fragmented request
  copies exactly its own blocks; the greedy tokens are the same either way;
- a transformers release that stops calling the engine's cache or attention function fails
  loudly, naming the version.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures

GREEDY = SamplingParams(max_tokens=5, temperature=0)
HEADS, LAYERS = 4, 2  # helpers.tiny_llama


@pytest.fixture
def sdpa_scores(monkeypatch):
    """Score elements (heads x queries x keys) of every SDPA call, however it is reached."""
    counted = []
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *a, **kw):
        counted.append(q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2])
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return counted


def test_attention_computes_only_the_scores_each_request_needs(sdpa_scores):
    # prefill chunks of 8 after a past, decode rows beside them, a prompt of one token
    engine = tiny_engine(max_num_seqs=8, block_size=4, chunk_size=8, token_budget=16, decode_batch_max_len=0)
    ps = prompts([3, 17, 9, 30, 1, 12], seed=4)
    for p in ps:
        engine.submit(p, GREEDY)
    steps = 0
    while True:
        sdpa_scores.clear()
        if not engine.step():
            break
        steps += 1
        tables = engine.last_tables
        needed = LAYERS * HEADS * sum(s.n * s.kv_len for s in tables.segments)
        # every segment's context is its own request's positions only
        for s in tables.segments:
            assert s.kv_len <= max(len(p) for p in ps) + GREEDY.max_tokens
        assert sum(sdpa_scores) == needed == tables.score_elements
    assert steps > GREEDY.max_tokens + 3
    assert_no_leaks(engine)


def test_decode_step_scores_do_not_grow_with_other_requests_context(sdpa_scores):
    """A decode step of 4 requests: scores = heads x layers x sum(own contexts), not x 4 (packed)."""
    engine = tiny_engine(max_num_seqs=4, block_size=4, token_budget=256, chunk_size=64, decode_batch_max_len=0)
    ps = prompts([20, 40, 7, 33], seed=2)
    for p in ps:
        engine.submit(p, SamplingParams(max_tokens=3, temperature=0))
    engine.step()  # all four prefills in one step
    sdpa_scores.clear()
    engine.step()  # all four decode
    contexts = [len(p) + 1 for p in ps]
    assert sum(sdpa_scores) == LAYERS * HEADS * sum(contexts)
    engine.run_until_done()


def test_short_decode_rows_share_one_padded_sdpa_and_long_ones_stay_their_own(sdpa_scores):
    """Decode rows of at most ``decode_batch_max_len`` positions run as one SDPA padded to the longest
    of them (never longer than the bound: padding is a constant, not another request's context); a
    longer request beside them computes and copies only its own; tokens equal the per-request path."""
    bound = 24
    ps = prompts([5, 11, 8, 60], seed=3)  # three short contexts, one past the bound
    sp = SamplingParams(max_tokens=6, temperature=0)
    batched = tiny_engine(max_num_seqs=4, block_size=4, token_budget=256, chunk_size=64, decode_batch_max_len=bound)
    reqs = [batched.submit(p, sp) for p in ps]
    batched.step()  # the four prefills
    decode_steps = 0
    while True:
        sdpa_scores.clear()
        if not batched.step():
            break
        t = batched.last_tables
        if t.decode is None:
            continue
        decode_steps += 1
        short = [s for s in t.segments if s.batched]
        long_ = [s for s in t.segments if not s.batched]
        assert len(short) == 3 and [s.kv_len for s in long_] == [len(ps[3]) + decode_steps]
        assert t.decode.width == max(s.kv_len for s in short) <= bound
        # one SDPA for the short rows (padded to the width), one of its own for the long request
        assert sorted(sdpa_scores) == sorted([HEADS * 3 * t.decode.width, HEADS * long_[0].kv_len] * LAYERS)
        assert t.score_elements == LAYERS * HEADS * (3 * t.decode.width + long_[0].kv_len)
        # copied out of the pool: the short rows' padded width only (the long request is read in place)
        assert t.gathered_bytes == LAYERS * 2 * 3 * t.decode.width * 2 * 8 * 4  # (K,V) x rows x width x kvh x d
    assert decode_steps == sp.max_tokens - 1
    alone = tiny_engine(max_num_seqs=4, block_size=4, token_budget=256, chunk_size=64, decode_batch_max_len=0)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in alone.generate(ps, sp)]
    for p, r in zip(ps, reqs):
        assert r.output_ids == greedy_ref(batched, None, p, sp.max_tokens)
    assert_no_leaks(batched)


def test_decode_batch_bound_is_validated():
    with pytest.raises(ValueError, match="decode_batch_max_len"):
        tiny_engine(decode_batch_max_len=-1)


def test_no_dynamic_cache_or_repeat_kv_in_a_step(monkeypatch):
    import transformers.models.llama.modeling_llama as llama
    from transformers.cache_utils import DynamicCache

    calls = []
    monkeypatch.setattr(DynamicCache, "update", lambda *a, **k: calls.append("DynamicCache.update"))
    monkeypatch.setattr(llama, "repeat_kv", lambda *a, **k: calls.append("repeat_kv"))
    engine = tiny_engine(max_num_seqs=4, block_size=4)
    reqs = engine.generate(prompts([5, 9, 2], seed=1), GREEDY)
    assert calls == [] and all(len(r.output_ids) == GREEDY.max_tokens for r in reqs)


def test_fragmented_blocks_are_gathered_per_request_and_give_the_same_tokens():
    ps = prompts([6, 11, 3, 14], seed=8)
    sp = SamplingParams(max_tokens=9, temperature=0)
    # a fragmented pool (every other block held elsewhere): no run of two blocks is free
    frag = tiny_engine(max_num_seqs=4, block_size=2, num_blocks=128, max_model_len=64, decode_batch_max_len=0)
    held = frag.pool.allocate(128)
    frag.pool.free(held[1::2])
    held = held[::2]
    reqs = [frag.submit(p, sp) for p in ps]
    gathered = []
    while frag.step():
        t = frag.last_tables
        # bytes copied out of the pool: exactly the fragmented requests' own blocks (keys + values)
        own = sum(-(-s.kv_len // 2) for s in t.segments if s.first < 0)
        assert t.gathered_bytes == LAYERS * 2 * own * 2 * 2 * 8 * 4  # blocks x (K,V) x bs x kvh x d x fp32
        gathered.append(own)
    assert any(gathered), "the test meant to exercise fragmented requests"
    for p, r in zip(ps, reqs):
        assert r.output_ids == greedy_ref(frag, None, p, sp.max_tokens)
    frag.pool.free(held)
    # a roomy pool: each request gets one run up front and nothing is ever copied out of the pool
    roomy = tiny_engine(max_num_seqs=4, block_size=2, decode_batch_max_len=0)
    reqs2 = [roomy.submit(p, sp) for p in ps]
    while roomy.step():
        assert roomy.last_tables.gathered_bytes == 0
        assert all(s.first >= 0 for s in roomy.last_tables.segments)
    assert [r.output_ids for r in reqs2] == [r.output_ids for r in reqs]
    assert_no_leaks(frag)
    assert_no_leaks(roomy)


def test_a_transformers_that_skips_the_cache_fails_loudly():
    import transformers

    engine = tiny_engine(max_num_seqs=2)
    attn = engine.model.model.layers[0].self_attn
    real = attn.forward
    # the keyword under which this release's attention takes the cache (5.24: cache; before: past_key_values)
    params = inspect.signature(type(attn).forward).parameters
    kw = next(k for k in ("cache", "past_key_values", "past_key_value") if k in params)
    attn.forward = lambda *a, **k: real(*a, **{**k, kw: None})  # as if a release stopped calling update
    engine.submit([3, 4, 5], GREEDY)
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__}.*1 cache updates"):
        engine.step()


def test_padding_of_the_decode_batch_never_reads_other_requests_blocks():
    """The padded decode batch masks its padding, but a masked position still multiplies its value
    by 0, and 0 * NaN is NaN: padding must read only the row's own blocks. Every block outside the
    batched rows' own is NaN here; the batch's output equals each row attended alone."""
    from fastadapters.serving.kv_blocks import BlockPool
    from fastadapters.serving.paged_attention import Segment, StepTables, decode_batch, paged_attention

    torch.manual_seed(0)
    pool = BlockPool(1, 2, 8, 4, 32)
    pool.keys[0].fill_(float("nan"))
    pool.values[0].fill_(float("nan"))
    owned = {0: [5, 9], 1: [12, 13, 14], 2: [20]}  # blocks of three requests (block 0 is nobody's)
    lens = {0: 7, 1: 11, 2: 3}
    for i, blocks in owned.items():
        for b in blocks:
            pool.keys[0][b].normal_()
            pool.values[0][b].normal_()
    q = torch.randn(1, 4, 3, 8)

    def tables(batched: bool):
        segs = [Segment(i, 1, lens[i], torch.tensor(owned[i]), -1) for i in range(3)]
        t = StepTables(torch.zeros(3, dtype=torch.long), segs)
        if batched:
            t.decode = decode_batch(segs, [torch.tensor(owned[i] + [0, 0]) for i in range(3)], 4, "cpu")
            assert t.decode is not None and t.decode.width == 11
        return t

    alone = paged_attention(q, pool, 0, tables(False), 0.3)
    together = paged_attention(q, pool, 0, tables(True), 0.3)
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,kvh,group,w,d", [(5, 3, 3, 37, 64), (1, 2, 5, 1, 16), (7, 4, 1, 23, 24)])
def test_decode_sdpa_is_grouped_query_attention(dtype, b, kvh, group, w, d):
    # a decode row's query heads viewed as (kv heads, group) rows of one plain SDPA equal
    # transformers' grouped-query attention (query head h reads KV head h // group): checked against
    # an fp64 reference with the KV heads repeated, within 2x the error of plain torch SDPA in dtype
    from fastadapters.serving.paged_attention import _decode_sdpa

    g = torch.Generator().manual_seed(b * 100 + w)
    q = torch.randn(b, kvh * group, d, generator=g)
    k = torch.randn(b, kvh, w, d, generator=g)
    v = torch.randn(b, kvh, w, d, generator=g)
    lens = torch.randint(1, w + 1, (b,), generator=g)
    mask = (torch.arange(w)[None, :] < lens[:, None])[:, None, None, :]
    scale = d ** -0.5

    def ref(q, k, v):  # (b, H, 1, d) against every KV head repeated per its group
        return F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(group, 1),
                                              v.repeat_interleave(group, 1), attn_mask=mask, scale=scale)[:, :, 0]

    exact = ref(q.double(), k.double(), v.double())
    got = _decode_sdpa(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale)
    plain = ref(q.to(dtype), k.to(dtype), v.to(dtype))
    assert got.shape == (b, kvh * group, d) and got.dtype == dtype
    err, base = (got.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, (err, base)
    # no mask: every position of every row
    full = _decode_sdpa(q.double(), k.double(), v.double(), None, scale)
    want = F.scaled_dot_product_attention(q.double()[:, :, None], k.double().repeat_interleave(group, 1),
                                          v.double().repeat_interleave(group, 1), scale=scale)[:, :, 0]
    torch.testing.assert_close(full, want)
