"""Decode steps replayed from captured graphs (issue 19, item 7), on the CPU.

``torch.cuda.graph`` cannot run without a GPU, so the engine's capture function is swapped for
``fx_capture``: ``make_fx`` records the step's tensor ops once over the engine's fixed buffers and
the replay re-runs only those ops -- like a CUDA graph, every Python decision taken while recording
is frozen, a host read of a tensor value (``.item()``, a data-dependent shape) fails the capture,
and each replay computes from whatever the fixed buffers hold then. FlashInfer is the fake of the
FlashInfer tests, extended with ``use_cuda_graph=True`` (page tables in buffers fixed at
construction, ``plan`` copying into them) and a ``run`` that is one custom op reading those buffers,
as the real kernel reads them on the device. Both attention paths of a graph are covered: that
FlashInfer, and SDPA over the padded decode batch. What this pins: greedy tokens equal the eager
SDPA engine's for a mixed-adapter stream whose batch shrinks through several capture sizes (and,
with SDPA, contexts through several widths), with padding rows; new mixes replayed without a
capture; a replay runs no Python of the model (no attention call is made; FlashInfer is only
planned); NaN in every KV block but the healthy requests' own (the poisoned request's, free
blocks, the padding rows' reserved block) leaves their tokens as alone; a store-layout change
recaptures; a failed capture warns once and the engine goes on eagerly (or raises when graphs were
required); the options' errors. Whether CUDA itself captures and replays the step is the GPU
session's to check (``tests/serving/test_gpu.py``, ``bench/decode_check.py``)."""
from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

from fastadapters.serving import cuda_graphs as cg
from fastadapters.serving.kv_blocks import BlockPool
from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import assert_no_leaks, install_fake_flashinfer, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures

LAYERS = 2  # helpers.tiny_llama


@torch.library.custom_op("fastadapters_test::paged_run", mutates_args=())
def _paged_run(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, qo: torch.Tensor, kv: torch.Tensor,
               idx: torch.Tensor, last: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """FlashInfer's paged prefill kernel, by its documented semantics, reading the page tables'
    current contents (bottom-right causal alignment)."""
    pages, ps, hkv, d = k_cache.shape
    group = q.shape[1] // hkv
    o = torch.empty_like(q)
    for i in range(qo.numel() - 1):
        q0, q1 = int(qo[i]), int(qo[i + 1])
        p0, p1 = int(kv[i]), int(kv[i + 1])
        kv_len = ps * (p1 - p0 - 1) + int(last[i])
        rows = idx[p0:p1].long()
        k = k_cache[rows].reshape(-1, hkv, d)[:kv_len].repeat_interleave(group, dim=1)
        v = v_cache[rows].reshape(-1, hkv, d)[:kv_len].repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), k.double()) * scale
        if causal:
            qi = torch.arange(q1 - q0)[:, None] + kv_len - (q1 - q0)
            s = s.masked_fill(torch.arange(kv_len)[None, :] > qi, float("-inf"))
        o[q0:q1] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)
    return o


class _FakeWrapper:
    """flashinfer.BatchPrefillWithPagedKVCacheWrapper, eager and ``use_cuda_graph=True`` modes."""

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None, **kw):
        assert kv_layout == "NHD"
        self.events = sys.modules["flashinfer"].events
        self.graph = use_cuda_graph
        if use_cuda_graph:
            bufs = (qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf, paged_kv_last_page_len_buf)
            assert all(isinstance(b, torch.Tensor) and b.dtype == torch.int32 for b in bufs)
            self.fixed = qo_indptr_buf.numel() - 1
            assert paged_kv_indptr_buf.numel() == self.fixed + 1 and paged_kv_last_page_len_buf.numel() == self.fixed
            self.bufs = bufs
        self.meta = None

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, causal=False, sm_scale=None, q_data_type="float16",
             kv_data_type=None, **kw):
        last = paged_kv_last_page_len
        assert bool(((last >= 1) & (last <= page_size)).all())
        tabs = (qo_indptr, paged_kv_indptr, paged_kv_indices, last)
        if self.graph:  # FlashInfer: the batch size is fixed for the wrapper's life; tables copied in
            assert qo_indptr.numel() - 1 == self.fixed, "batch size must stay fixed in CUDA graph mode"
            assert paged_kv_indices.numel() <= self.bufs[2].numel(), "indices exceed the buffer"
            for buf, t in zip(self.bufs, tabs):
                buf[:t.numel()].copy_(t)
            self.tabs = self.bufs
        else:
            self.tabs = tuple(t.clone() for t in tabs)
        self.meta = (num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal,
                     sm_scale if sm_scale is not None else 1 / math.sqrt(head_dim_qk), q_data_type)
        self.events.append("plan")

    def run(self, q, paged_kv_cache, **kw):
        hq, hkv, d, ps, causal, scale, q_dtype = self.meta
        k_cache, v_cache = paged_kv_cache
        assert k_cache.shape[1:] == (ps, hkv, d) and q.shape[1:] == (hq, d) and q.dtype == q_dtype
        self.events.append("run")
        return torch.ops.fastadapters_test.paged_run(q, k_cache, v_cache, *self.tabs, causal, float(scale))


@pytest.fixture
def fake_flashinfer(monkeypatch):
    return install_fake_flashinfer(monkeypatch, _FakeWrapper)


def fx_capture(fn, device):
    """A CUDA graph's semantics on the CPU (module docstring)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn)()
    fx_capture.count += 1
    return lambda: gm()


fx_capture.count = 0


@pytest.fixture(scope="module")
def cpp():
    from fastadapters.ops.cpu_ext import load_cpu_extension

    load_cpu_extension()  # graph mode routes through the C++ kernel's custom op (the torch backend syncs)


def _engine(paths, **kw):
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("block_size", 4)
    return tiny_engine(paths, **kw)


_ATTENTION_CALLS = [0]


@pytest.fixture
def count_attention(monkeypatch):
    """Count the model's paged-attention calls (Python: a replay must make none)."""
    from fastadapters.serving import hf_compat

    real = hf_compat.paged_attention

    def counted(*a, **k):
        _ATTENTION_CALLS[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(hf_compat, "paged_attention", counted)
    return _ATTENTION_CALLS


def _run(engine, ps, params, adapters, events=None):
    """Run to the end; per replayed step (not a capture): (FlashInfer events, attention calls)."""
    reqs = [engine.submit(p, sp, adapter=adapters.get(i)) for i, (p, sp) in enumerate(zip(ps, params))]
    replays = []
    while True:
        if events is not None:
            events.clear()
        before, calls = engine.stats["graph_steps"], _ATTENTION_CALLS[0]
        captures = engine._graphs.stats["captures"] if engine._graphs else 0
        if not engine.step():
            break
        if engine.stats["graph_steps"] > before and engine._graphs.stats["captures"] == captures:
            replays.append((list(events or []), _ATTENTION_CALLS[0] - calls))
    return [r.output_ids for r in reqs], replays


@pytest.mark.parametrize("attention", ["flashinfer", "sdpa"])
def test_greedy_tokens_equal_eager_through_several_capture_sizes(fake_flashinfer, zoo, cpp, one_thread, attention,
                                                                 count_attention):
    paths = {k: zoo[k] for k in ("lora_r4", "lora_r64", "houlsby", "pfeiffer", "parallel", "prefix")}
    ps = prompts([5, 9, 3, 12, 7, 2, 6], seed=11)
    adapters = {0: "lora_r4", 1: "lora_r64", 2: "houlsby", 3: "parallel", 4: "prefix", 5: "pfeiffer"}
    # different lengths: the decode batch shrinks 7 -> 1, through capture sizes 8, 4, 2, 1 (and, with
    # SDPA, contexts grow past 16 and 32 positions: decode-batch widths 16, 32, 64)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (3, 5, 7, 9, 11, 13, 40)]
    graphs = _engine(paths, backend="cpp", attention_backend=attention, _graph_capture=fx_capture)
    assert graphs._graphs is not None and graphs._graphs.sizes == (1, 2, 4, 8)
    got, replays = _run(graphs, ps, params, adapters, fake_flashinfer.events)
    eager = _engine(paths, attention_backend="sdpa", cuda_graphs=False)
    assert eager._graphs is None
    want, _ = _run(eager, ps, params, adapters)
    assert got == want
    st = graphs._graphs.stats
    keys = set(graphs._graphs.graphs)
    assert {p for p, _ in keys} == {1, 2, 4, 8} and st["captures"] == len(keys) and st["recaptures"] == 0
    # a replay runs none of the model's Python: no attention call is made (FlashInfer is only planned)
    assert replays and all(calls == 0 for _, calls in replays), replays
    if attention == "flashinfer":
        assert {w for _, w in keys} == {0}
        assert all(ev == ["plan"] for ev, _ in replays), replays
    else:
        assert {w for _, w in keys} == {16, 32, 64}, keys
        assert engine_stat(graphs, "kv_bytes_gathered") > 0
    assert st["replays"] == graphs.stats["graph_steps"] > st["captures"]
    assert st["padding_rows"] > 0
    assert_no_leaks(graphs)
    assert graphs.pool.reserved_blocks == [graphs.pool.num_blocks]


def engine_stat(engine, key):
    return engine.stats[key]


@pytest.mark.parametrize("attention", ["flashinfer", "sdpa"])
def test_a_graph_captured_for_base_rows_applies_adapters_later(fake_flashinfer, zoo, cpp, one_thread, attention):
    """The first decode step of a size routes no adapter; a later one at that size routes some."""
    paths = {"lora_r4": zoo["lora_r4"]}
    sp = [SamplingParams(max_tokens=4, temperature=0)] * 2
    eng = _engine(paths, backend="cpp", attention_backend=attention, _graph_capture=fx_capture)
    ref = _engine(paths, attention_backend="sdpa", cuda_graphs=False)
    ps = prompts([4, 6], seed=3)
    for mix in ({}, {0: "lora_r4", 1: "lora_r4"}, {1: "lora_r4"}):
        assert _run(eng, ps, sp, mix)[0] == _run(ref, ps, sp, mix)[0], mix
    assert eng._graphs.stats["captures"] == 1


@pytest.mark.parametrize("attention", ["flashinfer", "sdpa"])
def test_lru_slots_and_unload_load_between_graph_steps(fake_flashinfer, zoo, cpp, one_thread, attention):
    """max_loras=2 with three adapters (eager prefill steps move adapters between slots), then an
    unload and a load into the freed slot: the graphs' plans follow."""
    paths = {k: zoo[k] for k in ("lora_r4", "parallel", "houlsby")}
    sp = [SamplingParams(max_tokens=5, temperature=0)] * 2
    eng = _engine(paths, backend="cpp", attention_backend=attention, _graph_capture=fx_capture, max_loras=2)
    ref = _engine(paths, attention_backend="sdpa", cuda_graphs=False, max_loras=2)
    for seed, mix in enumerate(({0: "lora_r4", 1: "parallel"}, {0: "houlsby", 1: "lora_r4"},
                                {0: "parallel", 1: "houlsby"}, {0: "lora_r4"}, {1: "houlsby", 0: "parallel"})):
        ps = prompts([4, 6], seed=seed)
        assert _run(eng, ps, sp, mix)[0] == _run(ref, ps, sp, mix)[0], mix
    for e in (eng, ref):
        e.unload_adapter("lora_r4")
        e.load_adapter("lora_r64", zoo["lora_r64"], confined=False)
    ps = prompts([5, 3], seed=7)
    assert _run(eng, ps, sp, {0: "lora_r64", 1: "parallel"})[0] == _run(ref, ps, sp, {0: "lora_r64", 1: "parallel"})[0]
    assert eng._graphs.stats["replays"] > 0


def test_a_step_too_long_for_an_sdpa_graph_runs_eagerly(cpp, one_thread, monkeypatch):
    monkeypatch.setattr(cg, "SDPA_GRAPH_MAX_POSITIONS", 2 * 16)  # P = 2: contexts up to 16 positions
    sp = [SamplingParams(max_tokens=12, temperature=0)] * 2
    ps = prompts([3, 6], seed=4)
    eng = _engine(None, backend="cpp", attention_backend="sdpa", _graph_capture=fx_capture)
    got, _ = _run(eng, ps, sp, {})
    assert got == _run(_engine(None, attention_backend="sdpa", cuda_graphs=False), ps, sp, {})[0]
    st = eng._graphs.stats
    assert st["replays"] > 0 and st["too_long"] > 0 and set(eng._graphs.graphs) == {(2, 16)}
    assert eng.stats["graph_steps"] == st["replays"] and eng._graphs is not None


@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
def test_nan_in_the_unwritten_tail_of_a_rows_own_last_block(cpp, one_thread, graphs):
    """What a reused block of a poisoned request holds past the new owner's positions: padding
    positions of the decode batch must not read it (a masked NaN still gives 0 * NaN)."""
    sp = SamplingParams(max_tokens=8, temperature=0)
    ps = prompts([3, 6], seed=9)
    alone = [_run(_engine(None, attention_backend="sdpa", cuda_graphs=False), [p], [sp], {})[0][0] for p in ps]
    kw = dict(backend="cpp", _graph_capture=fx_capture) if graphs else dict(cuda_graphs=False)
    eng = _engine(None, attention_backend="sdpa", **kw)
    reqs = [eng.submit(p, sp) for p in ps]
    for _ in range(3):
        assert eng.step()
    pool, bs = eng.pool, eng.pool.block_size
    with torch.no_grad():
        for r in reqs:
            used = r.kv_len - (len(r.blocks) - 1) * bs
            for layer in range(pool.num_layers):
                pool.keys[layer][r.blocks[-1], used + 1:].fill_(float("nan"))  # + 1: the next step writes `used`
                pool.values[layer][r.blocks[-1], used + 1:].fill_(float("nan"))
    eng.run_until_done()
    assert [r.output_ids for r in reqs] == alone
    assert (eng.stats["graph_steps"] > 0) == graphs


@pytest.mark.parametrize("attention", ["flashinfer", "sdpa"])
def test_a_new_mix_replays_the_captured_graph(fake_flashinfer, zoo, cpp, one_thread, attention):
    """The same padded size, other adapters: the routing plans are refilled in place, no capture."""
    paths = {k: zoo[k] for k in ("lora_r4", "lora_r64", "houlsby")}
    sp = [SamplingParams(max_tokens=4, temperature=0)] * 2
    eng = _engine(paths, backend="cpp", attention_backend=attention, _graph_capture=fx_capture)
    ref = _engine(paths, attention_backend="sdpa", cuda_graphs=False)
    for mix in ({0: "lora_r4", 1: "houlsby"}, {0: "lora_r64"}, {1: "lora_r4", 0: "houlsby"}, {}):
        ps = prompts([4, 6], seed=len(mix))
        got, _ = _run(eng, ps, sp, mix)
        want, _ = _run(ref, ps, sp, mix)
        assert got == want, mix
    assert eng._graphs.stats["captures"] == 1 and len(eng._graphs.graphs) == 1
    (g,) = eng._graphs.graphs.values()
    assert g.size == 2 and g.router.refills >= 4


def test_sdpa_graph_padding_reads_only_each_rows_own_blocks(cpp, one_thread):
    """Mid-stream, NaN fills every KV block but the two healthy requests' own ones: the request
    whose blocks were poisoned, every free block and the padding rows' reserved block. The healthy
    requests of the same replayed decode batch keep the tokens they get alone (a row's padding
    positions read its own first block, masked; padding rows read only the reserved block); the
    poisoned one ends with an error."""
    sp = SamplingParams(max_tokens=8, temperature=0)
    ps = prompts([3, 11, 6], seed=9)
    alone = [_run(_engine(None, attention_backend="sdpa", cuda_graphs=False), [ps[i]], [sp], {})[0][0]
             for i in (0, 2)]
    eng = _engine(None, backend="cpp", attention_backend="sdpa", _graph_capture=fx_capture)
    reqs = [eng.submit(p, sp) for p in ps]
    while eng.stats["graph_steps"] < 2:
        assert eng.step()
    pool = eng.pool
    keep = set(reqs[0].blocks) | set(reqs[2].blocks)
    with torch.no_grad():
        for layer in range(pool.num_layers):
            for b in range(pool.num_blocks + len(pool.reserved_blocks)):
                if b not in keep:
                    pool.keys[layer][b].fill_(float("nan"))
                    pool.values[layer][b].fill_(float("nan"))
    eng.run_until_done()
    assert [reqs[0].output_ids, reqs[2].output_ids] == alone
    assert reqs[1].finish_reason == "error"
    assert eng._graphs.stats["padding_rows"] > 0 and eng.stats["graph_steps"] > 2


def test_store_layout_change_recaptures(fake_flashinfer, zoo, cpp, one_thread):
    paths = {"lora_r4": zoo["lora_r4"]}
    sp = [SamplingParams(max_tokens=4, temperature=0)] * 2
    eng = _engine(paths, backend="cpp", attention_backend="flashinfer", _graph_capture=fx_capture)
    ref = _engine(paths, attention_backend="sdpa", cuda_graphs=False)
    ps = prompts([3, 5], seed=2)
    assert _run(eng, ps, sp, {0: "lora_r4"})[0] == _run(ref, ps, sp, {0: "lora_r4"})[0]
    assert eng._graphs.stats["captures"] == 1
    for e in (eng, ref):  # a rank-64 adapter: a new bucket, new tables the old graph does not hold
        e.load_adapter("lora_r64", zoo["lora_r64"], confined=False)
    assert _run(eng, ps, sp, {1: "lora_r64"})[0] == _run(ref, ps, sp, {1: "lora_r64"})[0]
    assert eng._graphs.stats["captures"] == 2 and eng._graphs.stats["recaptures"] == 1


def test_a_failed_capture_warns_once_and_the_engine_goes_on_eagerly(fake_flashinfer, cpp, one_thread):
    def broken(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    ps = prompts([3, 4], seed=5)
    sp = [SamplingParams(max_tokens=3, temperature=0)] * 2
    eng = _engine(None, backend="cpp", attention_backend="flashinfer", _graph_capture=broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got, _ = _run(eng, ps, sp, {})
    msgs = [str(x.message) for x in w if "from a CUDA graph failed" in str(x.message)]
    assert len(msgs) == 1 and "operation not permitted" in msgs[0] and "--enforce-eager" in msgs[0]
    assert eng._graphs is None and eng.stats["graph_steps"] == 0
    ref = _engine(None, attention_backend="sdpa", cuda_graphs=False)
    assert got == _run(ref, ps, sp, {})[0]
    assert_no_leaks(eng)
    required = _engine(None, backend="cpp", attention_backend="flashinfer", _graph_capture=broken, cuda_graphs=True)
    required.submit(ps[0], sp[0])
    required.step()  # the prefill: eager
    with pytest.raises(RuntimeError, match="operation not permitted"):
        required.step()


def test_options_and_where_graphs_cannot_run(fake_flashinfer):
    with pytest.raises(ValueError, match="cuda_graphs: got 'yes'"):
        _engine(None, cuda_graphs="yes")
    with pytest.raises(ValueError, match="needs the model on CUDA|need the model on CUDA"):
        _engine(None, cuda_graphs=True)
    assert _engine(None)._graphs is None  # auto on the CPU: eager, nothing said (graphs are a CUDA feature)
    assert cg.capture_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    assert cg.capture_sizes(12) == (1, 2, 4, 8, 12)
    assert cg.capture_sizes(3) == (1, 2, 3)
    assert cg.capture_sizes(16, [8, 2, 8]) == (2, 8)
    for bad in ([], [0], [17], "8", [2.0]):
        with pytest.raises(ValueError, match="cuda_graph_sizes"):
            cg.capture_sizes(16, bad)
    from transformers import LlamaConfig, LlamaForCausalLM

    from .helpers import tiny_llama

    model = tiny_llama()
    assert cg.graphs_unavailable("cuda", model, "triton") is None
    assert "torch backend" in cg.graphs_unavailable("cuda", model, "torch")
    assert "on CUDA" in cg.graphs_unavailable("cpu", model, "cpp")
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    dynamic = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "rope_scaling"}))
    assert "'dynamic'" in cg.graphs_unavailable("cuda", dynamic, "triton")


def test_reserved_blocks_are_storage_only():
    pool = BlockPool(1, 2, 4, 4, 8, reserved=1)
    assert pool.keys[0].shape[0] == 9 and pool.flat_keys[0].shape[0] == 36
    assert pool.reserved_blocks == [8]
    got = pool.allocate(8)
    assert sorted(got) == list(range(8)) and pool.free_blocks == 0
    pool.free(got)
    assert pool.free_blocks == 8 and pool.used_blocks == 0
    with pytest.raises(ValueError, match="reserved"):
        BlockPool(1, 2, 4, 4, 8, reserved=-1)
