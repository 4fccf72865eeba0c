"""The engine's FlashInfer path (issue 19, item 1), on the CPU, against a fake ``flashinfer``.

No GPU was available when the path was written: these tests run it on the CPU (the private
``flashinfer_attention._ALLOW_CPU`` flag) against ``fake_flashinfer``, a plain-torch module that
implements the documented semantics of the two calls the engine makes --
``BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")``, ``.plan(qo_indptr,
paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim_qk,
page_size, causal=, sm_scale=, q_data_type=, kv_data_type=)`` and ``.run(q, (k_cache, v_cache))``,
signatures as in flashinfer 0.6.18 -- reading pages through indptr / indices / last-page length, with
the causal mask aligned to the bottom right (query j of qo_len sees positions <= kv_len - qo_len + j).
What they pin: the engine's greedy tokens equal the SDPA path's (chunked prefill beside decode rows,
a prefix-tuning request, a fragmented pool); ``plan`` once per step and ``run`` once per layer; the
page tables for a small case, by hand; one layer's output equals the SDPA path's; the selection
rules (warn once on CUDA without flashinfer, ValueError for bad or impossible choices, a loud
RuntimeError naming an unsupported version). Whether FlashInfer itself behaves as documented on a
GPU is what the one ``gpu``-marked test here (real ``flashinfer``, one layer vs the SDPA path) and
``bench/decode_check.py`` check; ``bench/gpu_session.sh`` runs both when a GPU session has
``flashinfer``. Neither has run yet.
"""
from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

from fastadapters.serving import flashinfer_attention as fia
from fastadapters.serving.kv_blocks import BlockPool
from fastadapters.serving.paged_attention import Segment, StepTables, chunk_mask, paged_attention
from fastadapters.serving.sampling import SamplingParams
from .helpers import tiny_llama
from .serve_helpers import assert_no_leaks, install_fake_flashinfer, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures

LAYERS = 2  # helpers.tiny_llama


class _FakePrefillWrapper:
    """flashinfer.BatchPrefillWithPagedKVCacheWrapper's documented semantics in plain torch."""

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, **kw):
        assert kv_layout == "NHD" and not use_cuda_graph
        self.events = sys.modules["flashinfer"].events
        self.plan_args = None

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None,
             causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1,
             logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             o_data_type=None, non_blocking=True, **kw):
        for t in (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len):
            assert t.dtype == torch.int32 and t.dim() == 1
        assert custom_mask is None and packed_custom_mask is None and pos_encoding_mode == "NONE"
        assert num_qo_heads % num_kv_heads == 0
        last = paged_kv_last_page_len
        assert bool(((last >= 1) & (last <= page_size)).all()), "1 <= last_page_len <= page_size"
        self.plan_args = dict(qo=qo_indptr.clone(), kv=paged_kv_indptr.clone(), idx=paged_kv_indices.clone(),
                              last=last.clone(), hq=num_qo_heads, hkv=num_kv_heads, d=head_dim_qk, ps=page_size,
                              causal=causal, scale=sm_scale if sm_scale is not None else 1 / math.sqrt(head_dim_qk),
                              q_dtype=q_data_type, kv_dtype=kv_data_type or q_data_type)
        self.events.append("plan")

    def run(self, q, paged_kv_cache, *args, out=None, lse=None, return_lse=False, **kw):
        a = self.plan_args
        assert a is not None, "run before plan"
        k_cache, v_cache = paged_kv_cache
        pages, ps, hkv, d = k_cache.shape
        assert (ps, hkv, d) == (a["ps"], a["hkv"], a["d"]) and v_cache.shape == k_cache.shape
        assert q.shape == (int(a["qo"][-1]), a["hq"], d) and q.dtype == a["q_dtype"] and k_cache.dtype == a["kv_dtype"]
        group = a["hq"] // hkv
        o = torch.empty_like(q)
        for i in range(a["qo"].numel() - 1):
            q0, q1 = int(a["qo"][i]), int(a["qo"][i + 1])
            p0, p1 = int(a["kv"][i]), int(a["kv"][i + 1])
            kv_len = ps * (p1 - p0 - 1) + int(a["last"][i])
            idx = a["idx"][p0:p1].long()
            k = k_cache[idx].reshape(-1, hkv, d)[:kv_len].repeat_interleave(group, dim=1)  # (kv, Hq, D)
            v = v_cache[idx].reshape(-1, hkv, d)[:kv_len].repeat_interleave(group, dim=1)
            qo_len = q1 - q0
            s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), k.double()) * a["scale"]
            if a["causal"]:  # bottom-right: query j sees positions <= kv_len - qo_len + j
                qi = torch.arange(qo_len)[:, None] + kv_len - qo_len
                s = s.masked_fill(torch.arange(kv_len)[None, :] > qi, float("-inf"))
            o[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)
        self.events.append("run")
        return o


@pytest.fixture
def fake_flashinfer(monkeypatch):
    return install_fake_flashinfer(monkeypatch, _FakePrefillWrapper)


def _run(engine, ps, sp, adapters=None, events=None):
    reqs = [engine.submit(p, sp, adapter=(adapters or {}).get(i)) for i, p in enumerate(ps)]
    steps = []
    while True:
        if events is not None:
            events.clear()
        if not engine.step():
            break
        t = engine.last_tables
        steps.append([(s.n, s.kv_len, s.first) for s in t.segments])
        if events is not None:  # one plan per step, one run per layer
            assert events == ["plan"] + ["run"] * LAYERS, events
            fi = t.extra["flashinfer"]
            assert (fi.plans, fi.runs) == (1, LAYERS)
            assert t.decode is None and all(s.mask is None for s in t.segments)
    return [r.output_ids for r in reqs], steps


def test_greedy_tokens_equal_the_sdpa_path_chunked_prefill_decode_and_prefix(fake_flashinfer, zoo):
    paths = {k: zoo[k] for k in ("prefix", "lora_r4")}
    ps = prompts([3, 17, 9, 30, 1, 12], seed=4)
    adapters = {1: "prefix", 3: "lora_r4", 4: "prefix"}
    sp = SamplingParams(max_tokens=6, temperature=0)
    kw = dict(max_num_seqs=8, block_size=4, chunk_size=8, token_budget=16)
    fi = tiny_engine(paths, attention_backend="flashinfer", **kw)
    assert fi.attention_backend == "flashinfer"
    got, steps = _run(fi, ps, sp, adapters, fake_flashinfer.events)
    ref = tiny_engine(paths, attention_backend="sdpa", **kw)
    assert ref.attention_backend == "sdpa" and ref._flashinfer is None
    want, _ = _run(ref, ps, sp, adapters)
    assert got == want
    flat = [seg for step in steps for seg in step]
    assert any(n > 1 and kv_len > n for n, kv_len, _ in flat), "meant: a prefill chunk after a past"
    assert any(n == 1 for n, _, _ in flat) and any(n > 1 for n, _, _ in flat), "meant: decode rows beside chunks"
    assert_no_leaks(fi)


def test_fragmented_pool_gives_the_same_tokens(fake_flashinfer):
    ps = prompts([6, 11, 3, 14], seed=8)
    sp = SamplingParams(max_tokens=9, temperature=0)
    outs = []
    for backend in ("flashinfer", "sdpa"):
        eng = tiny_engine(max_num_seqs=4, block_size=2, num_blocks=128, max_model_len=64,
                          attention_backend=backend)
        held = eng.pool.allocate(128)  # every other block held elsewhere: no run of two blocks is free
        eng.pool.free(held[1::2])
        out, steps = _run(eng, ps, sp, events=fake_flashinfer.events if backend == "flashinfer" else None)
        assert any(first < 0 for step in steps for _, _, first in step), "meant: fragmented requests"
        eng.pool.free(held[::2])
        assert_no_leaks(eng)
        outs.append(out)
    assert outs[0] == outs[1]


def test_page_tables_by_hand():
    # block_size 4: a first chunk of 5 (blocks 7, 3), a decode row at 9 positions (blocks 0, 1, 2; the
    # table holds a spare entry), a chunk of 3 after 5 positions (blocks 10, 11; a spare entry)
    segs = [Segment(0, 5, 5, None, -1), Segment(5, 1, 9, None, 0), Segment(6, 3, 8, None, -1)]
    tables = [torch.tensor([7, 3]), torch.tensor([0, 1, 2, 99]), torch.tensor([10, 11, 12])]
    qo, kv, idx, last = fia.page_tables(segs, tables, 4)
    for t in (qo, kv, idx, last):
        assert t.dtype == torch.int32 and t.device.type == "cpu"
    assert qo.tolist() == [0, 5, 6, 9]
    assert kv.tolist() == [0, 2, 5, 7]
    assert idx.tolist() == [7, 3, 0, 1, 2, 10, 11]
    assert last.tolist() == [1, 1, 4]


def test_one_layer_equals_the_sdpa_path(fake_flashinfer):
    torch.manual_seed(0)
    heads, kvh, d, bs = 4, 2, 8, 4
    pool = BlockPool(1, kvh, d, bs, 16)
    pool.keys[0].normal_()
    pool.values[0].normal_()
    # a chunk of 3 after 6 positions (fragmented: blocks 9, 2, 5), a decode row at 7 (run 0, 1),
    # a first chunk of 4 (one block, 12)
    blocks = [torch.tensor([9, 2, 5]), torch.tensor([0, 1]), torch.tensor([12])]
    segs = [Segment(0, 3, 9, blocks[0], -1, mask=chunk_mask(6, 3, "cpu")), Segment(3, 1, 7, None, 0),
            Segment(4, 4, 4, None, 12, causal=True)]
    query = torch.randn(1, heads, 8, d)
    want = paged_attention(query, pool, 0, StepTables(torch.zeros(0, dtype=torch.long), segs), 0.3)
    owner = fia.FlashInferAttention("cpu")
    tables = StepTables(torch.zeros(0, dtype=torch.long), segs)
    tables.extra["flashinfer"] = owner.step(segs, blocks, bs)
    got = paged_attention(query, pool, 0, tables, 0.3)
    assert got.shape == want.shape == (1, 8, heads, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert fake_flashinfer.events == ["plan", "run"]
    assert tables.score_elements == heads * (3 * 9 + 1 * 7 + 4 * 4)
    with pytest.raises(RuntimeError, match="one plan per step"):  # another layer with another scaling
        paged_attention(query, pool, 0, tables, 0.5)


def test_cuda_without_flashinfer_warns_once_and_uses_sdpa(monkeypatch):
    monkeypatch.setattr(fia, "_is_cuda", lambda device: True)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    monkeypatch.setattr(fia, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engines = [_engine(torch.bfloat16) for _ in range(2)]
        assert fia.select_backend("auto", "cuda", torch.float16) == "sdpa"
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning) and "flashinfer" in str(w.message)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "not installed" in str(runtime[0].message) and "pip install flashinfer-python" in str(runtime[0].message)
    assert all(e.attention_backend == "sdpa" and e._flashinfer is None for e in engines)
    with pytest.raises(ValueError, match="pip install flashinfer-python"):  # asked for explicitly: an error
        _engine(torch.bfloat16, attention_backend="flashinfer")


def test_fp32_on_cuda_warns_once_and_explicit_flashinfer_is_refused(monkeypatch, fake_flashinfer):
    monkeypatch.setattr(fia, "_ALLOW_CPU", False)
    monkeypatch.setattr(fia, "_is_cuda", lambda device: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fia.select_backend("auto", "cuda", torch.float32) == "sdpa"
        assert fia.select_backend("auto", "cuda", torch.float32) == "sdpa"
    assert len([w for w in caught if "fp16 or bf16" in str(w.message)]) == 1
    with pytest.raises(ValueError, match="fp16 or bf16"):
        fia.select_backend("flashinfer", "cuda", torch.float32)
    assert fia.select_backend("auto", "cuda", torch.bfloat16) == "flashinfer"  # installed (the fake)


@pytest.mark.parametrize("version", ["0.5.3", "0.8.0", "1.0.0", "unknown"])
def test_an_unsupported_flashinfer_version_fails_loudly_naming_it(fake_flashinfer, version):
    fake_flashinfer.__version__ = version
    for asked in ("auto", "flashinfer"):
        with pytest.raises(RuntimeError, match=rf"flashinfer {version} is installed.*>= 0\.6, < 0\.8"):
            fia.select_backend(asked, "cuda", torch.bfloat16)
    assert fia.select_backend("sdpa", "cuda", torch.bfloat16) == "sdpa"  # an explicit opt-out still works


@pytest.mark.parametrize("bad", ["flash", "SDPA", "", None, 1, True])
def test_bad_attention_backend_values_are_refused(bad):
    with pytest.raises(ValueError, match="valid: 'auto'"):
        _engine(torch.float32, attention_backend=bad)


def test_flashinfer_on_the_cpu_is_refused_and_auto_and_sdpa_use_sdpa(monkeypatch):
    def no_import():
        raise AssertionError("the CPU path must not import flashinfer")

    monkeypatch.setattr(fia, "_import_flashinfer", no_import)
    with pytest.raises(ValueError, match="needs the model on CUDA; it is on cpu"):
        _engine(torch.float32, attention_backend="flashinfer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU is no reason to warn
        assert _engine(torch.float32).attention_backend == "sdpa"
        assert _engine(torch.float32, attention_backend="sdpa").attention_backend == "sdpa"


def _engine(dtype, **kw):
    from fastadapters.serving.engine import Engine

    return Engine(tiny_llama().to(dtype), backend="torch", num_blocks=16, max_model_len=32, **kw)


def _real_flashinfer() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _real_flashinfer(), reason="needs CUDA and flashinfer")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_flashinfer_one_layer_equals_the_sdpa_path_on_cuda(dtype):
    """The one check of FlashInfer itself (bench/gpu_session.sh runs it with ``-m gpu``): one layer,
    head_dim 64, GQA 4:1, block_size 16 -- a chunk of 20 after 37 positions over fragmented blocks, a
    decode row at 50 positions, a first chunk of 33, a decode row at 1 position."""
    fia._import_flashinfer()  # an unsupported version fails here, named
    torch.manual_seed(0)
    heads, kvh, d, bs = 8, 2, 64, 16
    pool = BlockPool(1, kvh, d, bs, 32, dtype=dtype, device="cuda")
    pool.keys[0].normal_()
    pool.values[0].normal_()
    host = [torch.tensor([9, 2, 5, 30]), torch.tensor([0, 1, 2, 3]), torch.tensor([12, 13, 14]), torch.tensor([20])]
    segs = [Segment(0, 20, 57, host[0].cuda(), -1, mask=chunk_mask(37, 20, "cuda")), Segment(20, 1, 50, None, 0),
            Segment(21, 33, 33, None, 12, causal=True), Segment(54, 1, 1, None, 20)]
    query = torch.randn(1, heads, 55, d, device="cuda", dtype=dtype)
    want = paged_attention(query, pool, 0, StepTables(torch.zeros(0, dtype=torch.long), segs), d ** -0.5)
    tables = StepTables(torch.zeros(0, dtype=torch.long, device="cuda"), segs)
    tables.extra["flashinfer"] = fia.FlashInferAttention("cuda").step(segs, host, bs)
    got = paged_attention(query, pool, 0, tables, d ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
