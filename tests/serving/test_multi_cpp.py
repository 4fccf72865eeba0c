"""The multi-adapter op's ``cpp`` backend (csrc/cpu_multi_adapter.cpp, the CPU default under
``auto``): the fp64 reference at odd sizes in fp32 / fp64 / bf16, both of its paths (fused dot
products for small slot groups, ATen GEMMs for large ones), both storages of ``up``, in place and
aliased, isolation from NaN in other slots and in padding, bad inputs, the dispatch rules (auto,
explicit, unavailable, autograd) and the router's direct call.

The kernel is compiled on first use (about a minute on 2 cores, then cached in
``$TORCH_EXTENSIONS_DIR``); every test here needs it, so a machine that cannot build it fails them
with the build's reason rather than skipping."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastadapters.ops import dispatch
from fastadapters.ops import multi as mo
from fastadapters.ops.cpu_ext import load_cpu_extension

ACTS = list(mo.ACT_BY_ID)


@pytest.fixture(scope="module")
def ext():
    return load_cpu_extension()


def _case(m=37, k=101, n=75, s=7, r=16, dtype=torch.float32, seed=0, sizes=(1, 5, 16, 0, 4, 9, 3),
          rows="uniform", transposed_up=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    y0 = torch.randn(m, n, generator=g).to(dtype)
    down = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
    up = (torch.randn(s, n, r, generator=g) / 4).to(dtype)
    if transposed_up:  # the adapter store's CPU storage: (S, R, N) exposed as (S, N, R)
        up = up.transpose(1, 2).contiguous().transpose(1, 2)
    sz = torch.tensor(list(sizes)[:s], dtype=torch.int32)
    scales = torch.rand(s, generator=g) + 0.5
    act = torch.tensor([ACTS[i % len(ACTS)] for i in range(s)], dtype=torch.int32)
    if rows == "uniform":
        rs = torch.randint(-1, s, (m,), generator=g)
    elif rows == "segments":  # prefill: each slot's rows back to back, long enough for the GEMM path
        rs = (torch.arange(m) * s // m)
        rs[: m // 10] = -1
    else:
        raise KeyError(rows)
    return y0, x, rs.to(torch.int32), down, up, sz, scales, act


def _ref64(args):
    y0, x, rs, down, up, sz, sc, act = args
    return mo.multi_adapter_ref(y0.double(), x.double(), rs, down.double(), up.double(), sz, sc.double(), act)


@pytest.mark.parametrize("transposed_up", [False, True], ids=["up-NR", "up-RN"])
@pytest.mark.parametrize("rows,m", [("uniform", 1), ("uniform", 37), ("segments", 301)])
def test_matches_fp64_reference_fp32_and_fp64(ext, rows, m, transposed_up):
    args = _case(m=m, rows=rows, transposed_up=transposed_up)
    ref = _ref64(args)
    got = mo.multi_adapter(*args, backend="cpp")
    assert got.dtype == torch.float32 and got.shape == args[0].shape
    err, err_t = (got.double() - ref).abs().max(), (mo.multi_adapter_ref(*args).double() - ref).abs().max()
    assert err <= 2 * err_t + 1e-6, (err, err_t)
    got64 = mo.multi_adapter(*[a.double() if a.is_floating_point() and a is not args[6] else a for a in args],
                             backend="cpp")
    torch.testing.assert_close(got64, ref, atol=1e-12, rtol=1e-12)
    # which path ran: the returned count of GEMM-path rows follows the slot group sizes
    y = args[0].clone()
    gemm = ext.cpu_multi_adapter_(y, args[1], args[2], args[3], args[4], args[5], args[6], args[7], 8)
    counts = torch.bincount(args[2][args[2] >= 0].long(), minlength=7)
    live = args[5] > 0
    assert gemm == int(counts[(counts >= 8) & live].sum())
    assert gemm > 0 if rows == "segments" else gemm < m


@pytest.mark.parametrize("k,n", [(101, 75), (64, 64), (7, 130)])
def test_fp32_small_groups_every_row_count_and_rank(ext, k, n):
    """float32 with the store's transposed ``up`` has loops of its own (one weight stream for 1-2
    rows, register tiles for more): every group size 1..9 (tile-row remainders 1..3),
    ranks 1..13 (remainders of the 4-rank blocks), widths with and without a vector remainder, every
    activation, against the fp64 reference within twice plain torch's fp32 error; the general loops
    (``up`` contiguous) agree, and an aliased x (the output phase) reads each row before writing it."""
    g = torch.Generator().manual_seed(k + n)
    s, r = 9, 13
    rs = torch.cat([torch.full((c,), c - 1, dtype=torch.int32) for c in range(1, 10)])  # slot i: i + 1 rows
    rs = rs[torch.randperm(len(rs), generator=g)]
    m = len(rs)
    x = torch.randn(m, k, generator=g)
    y0 = torch.randn(m, n, generator=g)
    down = torch.randn(s, r, k, generator=g) / k ** 0.5
    up_nr = torch.randn(s, n, r, generator=g) / 4
    up_rn = up_nr.transpose(1, 2).contiguous().transpose(1, 2)
    sz = torch.tensor([1, 2, 3, 4, 5, 8, 11, 12, 13], dtype=torch.int32)
    sc = torch.rand(s, generator=g) + 0.5
    act = torch.tensor([ACTS[i % len(ACTS)] for i in range(s)], dtype=torch.int32)
    ref = _ref64((y0, x, rs, down, up_nr, sz, sc, act))
    err_t = (mo.multi_adapter_ref(y0, x, rs, down, up_nr, sz, sc, act).double() - ref).abs().max()
    # the op's GEMM threshold: where these loops run (float32, the store's storage) 64 rows, 128 in
    # an AVX-512 build; else 16
    from fastadapters.ops import cpu_ext

    assert cpu_ext.LOADED_ISA == cpu_ext._isa()
    f32_rows = mo.CPP_GEMM_MIN_ROWS_F32_AVX512 if cpu_ext.LOADED_ISA == "avx512" else 64
    assert mo.CPP_GEMM_MIN_ROWS_F32_AVX512 >= 1 << 40  # the AVX-512 build's tiles beat the GEMMs at every size
    assert mo.cpp_gemm_min_rows(torch.float32, up_rn) == mo.cpp_gemm_min_rows(torch.float32) == f32_rows
    assert mo.cpp_gemm_min_rows(torch.bfloat16, up_rn) == f32_rows  # bfloat16 has the same loops
    assert mo.cpp_gemm_min_rows(torch.float32, up_nr) == mo.cpp_gemm_min_rows(torch.float16, up_rn) == 16
    for up in (up_rn, up_nr):
        y = y0.clone()
        assert ext.cpu_multi_adapter_(y, x, rs, down, up, sz, sc, act, 64) == 0  # no group took the GEMMs
        assert (y.double() - ref).abs().max() <= 2 * err_t + 1e-6
    if k == n:
        ref = _ref64((y0, y0, rs, down, up_nr, sz, sc, act))
        y = y0.clone()
        ext.cpu_multi_adapter_(y, y, rs, down, up_rn, sz, sc, act, 64)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k,n", [(93, 101), (576, 192)])
def test_register_tiles_at_chunk_boundaries(ext, dtype, k, n):
    """The tiles of 3+ rows in chunks of 64 rows: groups of 3, 5, 63, 64, 65 and 130 rows (a chunk
    and a remainder of 1, two chunks and 2), ranks 1..19 with every remainder of the 4-rank blocks,
    widths with 64-output blocks, single vectors and a scalar tail (101 = 64 + 2 x 16 + 5), every
    activation: against the fp64 reference within twice plain torch's error in the same dtype, with
    no GEMM taken."""
    g = torch.Generator().manual_seed(k * n)
    counts = [3, 5, 63, 64, 65, 130]
    sizes = [19, 1, 6, 13, 16, 7]
    s, r = len(counts), max(sizes)
    rs = torch.cat([torch.full((c,), i, dtype=torch.int32) for i, c in enumerate(counts)])
    rs = rs[torch.randperm(len(rs), generator=g)]
    m = len(rs)
    x = torch.randn(m, k, generator=g).to(dtype)
    y0 = torch.randn(m, n, generator=g).to(dtype)
    down = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
    up_nr = (torch.randn(s, n, r, generator=g) / 4).to(dtype)
    up_rn = up_nr.transpose(1, 2).contiguous().transpose(1, 2)
    sz = torch.tensor(sizes, dtype=torch.int32)
    sc = torch.rand(s, generator=g) + 0.5
    act = torch.tensor([ACTS[i % len(ACTS)] for i in range(s)], dtype=torch.int32)
    ref = _ref64((y0, x, rs, down, up_nr, sz, sc, act))
    err_t = (mo.multi_adapter_ref(y0, x, rs, down, up_nr, sz, sc, act).double() - ref).abs().max()
    y = y0.clone()
    assert ext.cpu_multi_adapter_(y, x, rs, down, up_rn, sz, sc, act, 1 << 40) == 0
    err = (y.double() - ref).abs().max()
    slack = 1e-6 if dtype == torch.float32 else 2 ** -7 * ref.abs().max()
    assert err <= 2 * err_t + slack, (err, err_t)


@pytest.mark.parametrize("k,n", [(7, 75), (101, 130), (608, 608)])
def test_bf16_decode_groups_within_rule(ext, k, n):
    """bfloat16 groups of 1 and 2 rows (decode) with the store's storage: the split loops (x rows
    and output kept even-then-odd per block of 2 x kVW). Widths with no whole block (7), a block
    and a tail (101) and whole blocks plus a half (608); every activation; against the fp64
    reference within twice plain torch's bf16 error, rows of no adapter untouched, and aliased
    (y is x: every h before any write)."""
    g = torch.Generator().manual_seed(k)
    s, r = 8, 19
    rs = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, -1], dtype=torch.int32)
    rs = rs[torch.randperm(len(rs), generator=g)]
    m = len(rs)
    x = torch.randn(m, k, generator=g).bfloat16()
    y0 = torch.randn(m, n, generator=g).bfloat16()
    down = (torch.randn(s, r, k, generator=g) / k ** 0.5).bfloat16()
    up_nr = (torch.randn(s, n, r, generator=g) / 4).bfloat16()
    up_rn = up_nr.transpose(1, 2).contiguous().transpose(1, 2)
    sz = torch.tensor([19, 1, 4, 7, 16, 9, 13, 2], dtype=torch.int32)
    sc = torch.rand(s, generator=g) + 0.5
    act = torch.tensor([ACTS[i % len(ACTS)] for i in range(s)], dtype=torch.int32)
    for aliased in [False] + [True] * (k == n):
        xx = y0 if aliased else x
        ref = _ref64((y0, xx, rs, down, up_nr, sz, sc, act))
        err_t = (mo.multi_adapter_ref(y0, xx, rs, down, up_nr, sz, sc, act).double() - ref).abs().max()
        y = y0.clone()
        assert ext.cpu_multi_adapter_(y, y if aliased else xx, rs, down, up_rn, sz, sc, act, 1 << 40) == 0
        err = (y.double() - ref).abs().max()
        assert err <= 2 * err_t + 2 ** -7 * ref.abs().max(), (aliased, err, err_t)
        assert torch.equal(y[rs < 0], y0[rs < 0])


@pytest.mark.parametrize("transposed_up", [False, True], ids=["up-NR", "up-RN"])  # up-RN: the vector loops
@pytest.mark.parametrize("rows,m", [("uniform", 1), ("uniform", 37), ("uniform", 90), ("segments", 203),
                                    ("segments", 1203)])
def test_bf16_within_rule(rows, m, transposed_up):
    # uniform 90 rows over 7 slots: groups of 3+ rows (register blocks) below the GEMM threshold; 203
    # segments: groups of ~29 rows, register blocks with the store's storage, GEMMs with (S, N, R);
    # 1203: ~155 rows a group, GEMMs with either
    args = _case(m=m, rows=rows, dtype=torch.bfloat16, seed=5, transposed_up=transposed_up)
    ref = _ref64(args)
    got = mo.multi_adapter(*args, backend="cpp")
    ref_t = mo.multi_adapter_ref(*args)  # the plain-torch statement in bf16 storage
    assert got.dtype == torch.bfloat16
    err, err_t = (got.double() - ref).abs().max(), (ref_t.double() - ref).abs().max()
    assert err <= 2 * err_t + 2 ** -7 * ref.abs().max()


@pytest.mark.parametrize("rows,m", [("uniform", 37), ("segments", 301)])
def test_isolation_from_nan_in_other_slots_and_padding(rows, m):
    y0, x, rs, down, up, sz, sc, act = _case(m=m, rows=rows, seed=3)
    clean = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp")
    for s in range(down.shape[0]):  # padding beyond each adapter's size: never read
        down[s, sz[s]:] = float("nan")
        up[s, :, sz[s]:] = float("nan")
    poisoned = 2
    down[poisoned] = float("nan")
    got = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp")
    mine = rs == poisoned
    assert bool(torch.isnan(got[mine]).all())
    assert torch.equal(got[~mine], clean[~mine])  # bit for bit: nobody else read slot 2 or any padding
    assert torch.equal(got[rs < 0], y0[rs < 0])


def test_in_place_and_aliased_input():
    y0, x, rs, down, up, sz, sc, act = _case(n=101)  # N == K: an output adapter h + f(h)
    keep = y0.clone()
    out = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp")
    assert torch.equal(y0, keep) and out.data_ptr() != y0.data_ptr()  # functional by default
    ref = _ref64((y0, x, rs, down, up, sz, sc, act))
    inplace = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp", inplace=True)
    assert inplace.data_ptr() == y0.data_ptr()
    torch.testing.assert_close(y0.double(), ref, atol=1e-5, rtol=1e-5)
    # x is y itself (Router: the post-output phase): each row's input is read before it is written
    for rows, m in (("uniform", 37), ("segments", 301)):
        y0, _, rs, down, up, sz, sc, act = _case(m=m, n=101, rows=rows, seed=7)
        ref = _ref64((y0, y0, rs, down, up, sz, sc, act))
        y = y0.clone()
        mo.multi_adapter(y, y, rs, down, up, sz, sc, act, backend="cpp", inplace=True)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes_compute_in_fp32_and_return_y0_dtype():
    y0, x, rs, down, up, sz, sc, act = _case(seed=11)
    yb, xb = y0.bfloat16(), x.bfloat16()  # a bf16 model beside fp32 tables
    ref = mo.multi_adapter_ref(yb.double(), xb.double(), rs, down.double(), up.double(), sz, sc.double(), act)
    got = mo.multi_adapter(yb, xb, rs, down, up, sz, sc, act, backend="cpp")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref.bfloat16().double(), atol=0, rtol=2 ** -7)
    inplace = yb.clone()
    out = mo.multi_adapter(inplace, xb, rs, down, up, sz, sc, act, backend="cpp", inplace=True)
    assert out.data_ptr() == inplace.data_ptr() and torch.equal(inplace, got)


def test_never_writes_a_caller_tensor_it_does_not_own():
    """Review: fp32 y0 beside bf16 tables went through ``y0.to(fp32)`` (y0 itself) and was written."""
    y0, x, rs, down, up, sz, sc, act = _case(seed=17)
    keep = y0.clone()
    got = mo.multi_adapter(y0, x, rs, down.bfloat16(), up.bfloat16(), sz, sc, act, backend="cpp")
    assert torch.equal(y0, keep) and got.data_ptr() != y0.data_ptr()
    ref = mo.multi_adapter_ref(y0.double(), x.double(), rs, down.bfloat16().double(), up.bfloat16().double(), sz,
                               sc.double(), act)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # in place: the version counter moves, as for any in-place op (autograd sees the change)
    v = y0._version
    mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp", inplace=True)
    assert y0._version > v
    # strided small tensors are made contiguous, not refused
    y0, x, rs, down, up, sz, sc, act = _case(m=74, seed=19)
    wide = torch.stack([rs, torch.full_like(rs, -1)], 1).flatten()[::2]  # rs again, stride 2
    assert not wide.is_contiguous()
    torch.testing.assert_close(mo.multi_adapter(y0, x, wide, down, up, sz, sc, act, backend="cpp"),
                               mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp"), atol=0, rtol=0)


def test_bad_values_raise_before_any_write(ext):
    y0, x, rs, down, up, sz, sc, act = _case()
    y = y0.clone()
    bad = rs.clone()
    bad[-1] = 7
    with pytest.raises(RuntimeError, match=r"row_slot\[36\] = 7; valid: -1 \(base\) or 0..6"):
        ext.cpu_multi_adapter_(y, x, bad, down, up, sz, sc, act, 8)
    assert torch.equal(y, y0)
    with pytest.raises(RuntimeError, match=r"act_ids\[0\] = 9; valid: 0..5"):
        ext.cpu_multi_adapter_(y, x, rs, down, up, sz, sc, torch.full_like(act, 9), 8)
    with pytest.raises(RuntimeError, match=r"expected up \(7, 75, 16\)"):
        ext.cpu_multi_adapter_(y, x, rs, down, up[:, :74], sz, sc, act, 8)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.cpu_multi_adapter_(y, x.double(), rs, down, up, sz, sc, act, 8)
    assert torch.equal(y, y0)
    # the checked entry point names the value before the kernel runs
    with pytest.raises(ValueError, match="row_slot: got slot 7"):
        mo.multi_adapter(y0, x, bad, down, up, sz, sc, act, backend="cpp")


def test_auto_takes_cpp_on_the_cpu_and_explicit_cpp_needs_cpu():
    assert dispatch.resolve(mo.OP, None, torch.device("cpu")) == "cpp"
    assert dispatch.resolve(mo.OP, "auto", torch.device("cpu")) == "cpp"
    assert dispatch.resolve(mo.OP, "torch", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="backend 'cpp' needs CPU tensors"):
        dispatch.resolve(mo.OP, "cpp", torch.device("cuda"))
    # ops without a C++ kernel keep torch under auto, and refuse an explicit cpp with the reason
    assert dispatch.resolve("lora_linear", None, torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="has no cpp implementation"):
        dispatch.resolve("lora_linear", "cpp", torch.device("cpu"))


def test_unbuildable_kernel_warns_once_and_runs_torch(monkeypatch):
    reason = "fastadapters: the CPU kernel is unavailable: no C++ compiler (test)"
    monkeypatch.setitem(dispatch._PROBES, (mo.OP, "cpp"), lambda: reason)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    args = _case()
    with pytest.warns(RuntimeWarning, match="runs the plain torch path.*no C\\+\\+ compiler"):
        assert dispatch.resolve(mo.OP, None, torch.device("cpu")) == "torch"
        got = mo.multi_adapter(*args)
    torch.testing.assert_close(got.double(), _ref64(args), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        mo.multi_adapter(*args)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        mo.multi_adapter(*args, backend="cpp")


def test_autograd_inputs_take_the_torch_path_with_a_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_WARNED", set())
    y0, x, rs, down, up, sz, sc, act = _case()
    x = x.requires_grad_()
    with pytest.warns(RuntimeWarning, match="no backward"):
        out = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="cpp")
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    mo.multi_adapter(y0, x2, rs, down, up, sz, sc, act, backend="torch").sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_store_keeps_up_transposed_on_the_cpu_and_router_calls_the_kernel(ext, monkeypatch):
    """A routed forward of a mixed batch (LoRA of two ranks, series and parallel adapters) runs the
    C++ kernel on every bucket table (the store's transposed ``up``) and gives what the torch
    backend gives."""
    import fastadapters as fa
    from fastadapters.serving.store import get_store
    from .helpers import VOCAB, tiny_llama

    model = tiny_llama()
    torch.manual_seed(0)
    fa.patch(model, adapter="lora", r=4, name="l4", target_modules=["q_proj", "v_proj"])
    fa.patch(model, adapter="lora", r=16, name="l16", target_modules=["q_proj", "o_proj"])
    fa.patch(model, adapter="series", name="ser", bottleneck_size=8)
    fa.patch(model, adapter="parallel", name="par", bottleneck_size=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.eval()
    names = ["l4", None, "ser", "l16", "par", "l4"]
    ids = torch.randint(3, VOCAB, (6, 9))
    with torch.inference_mode():
        with fa.route(model, names, backend="torch"):
            want = model(ids).logits
        calls = []
        real = ext.cpu_multi_adapter_

        class Spy:
            def __getattr__(self, k):
                return getattr(ext, k)

            def cpu_multi_adapter_(self, *a):
                calls.append(a[4].stride())
                return real(*a)

            def cpu_multi_adapter_calls_(self, y, x, table_calls, m):  # the router's one call per phase
                calls.extend(u.stride() for u in table_calls.up)
                return ext.cpu_multi_adapter_calls_(y, x, table_calls, m)

        monkeypatch.setattr("fastadapters.ops.cpu_ext._LOADED", Spy())
        with fa.route(model, names):
            got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls, "the routed forward did not call the C++ kernel"
    store = get_store(model)
    for t in (t for lt in store.layers.values() for t in lt.tables()):
        assert t.up.stride(1) == 1, "CPU tables keep up as (S, R, N) storage"
    assert all(st[1] == 1 for st in calls)


def test_router_makes_one_kernel_call_per_phase_whatever_the_rank_buckets(ext, monkeypatch):
    """The router's CPU fast path: a layer phase whose rows use four rank buckets (LoRA r 3 / 8 /
    16 / 40 plus a Houlsby adapter) is one prepared ``cpu_multi_adapter_calls_`` call, never a
    Python call per bucket; the prepared calls are built once per layer and input shape and reused
    by the next forward of that shape; the packed (serving) and per-row routes give the torch
    backend's logits; with grad enabled the general path runs instead (no prepared calls)."""
    import fastadapters as fa
    from fastadapters.patching import _wrappers
    from fastadapters.serving.store import get_store
    from .helpers import VOCAB, tiny_llama

    model = tiny_llama(hidden=40)
    for name, r in (("r3", 3), ("r8", 8), ("r16", 16), ("r40", 40)):
        fa.patch(model, adapter="lora", r=r, alpha=8, name=name, target_modules=["q_proj", "v_proj", "o_proj"])
    fa.patch(model, adapter="series", variant="houlsby", name="ser", bottleneck_size=6)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    names = ["r3", "r40", None, "r8", "ser", "r16", "r3"]
    ids = torch.randint(3, VOCAB, (len(names), 11), generator=torch.Generator().manual_seed(2))
    counts = {"calls_": 0, "direct": 0, "built": 0}
    per_phase: list[int] = []

    class Spy:
        def __getattr__(self, k):
            return getattr(ext, k)

        def TableCalls(self, *lists):  # noqa: N802 (the extension's class name)
            counts["built"] += 1
            return ext.TableCalls(*lists)

        def cpu_multi_adapter_(self, *a):
            counts["direct"] += 1
            return ext.cpu_multi_adapter_(*a)

        def cpu_multi_adapter_calls_(self, y, x, calls, m):
            counts["calls_"] += 1
            per_phase.append(len(calls))
            return ext.cpu_multi_adapter_calls_(y, x, calls, m)

    with torch.no_grad():
        with fa.route(model, names, backend="torch"):
            want = model(ids).logits
        monkeypatch.setattr("fastadapters.ops.cpu_ext._LOADED", Spy())
        with fa.route(model, names) as router:
            got = model(ids).logits
            first = dict(counts)
            again = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, got)
    layers = [w for _, w in _wrappers(model)]
    store = get_store(model)
    phases = sum(bool(d) for w in layers for d in (store.tables(w).pre, store.tables(w).post_in,
                                                        store.tables(w).post_out) if store.tables(w) is not None)
    assert first["direct"] == 0 and first["calls_"] == phases, (first, phases)
    assert max(per_phase) == 4, "the q/v/o phases hold the rows of four rank buckets in one call"
    assert first["built"] == phases  # prepared once per layer phase ...
    assert counts["built"] == phases and counts["calls_"] == 2 * phases  # ... and reused by the next forward
    assert router._fast and all(e is not False for k, e in router._fast.items() if k != "stamp")

    # grad enabled: the general path (its own kernel dispatch), no prepared calls, the same logits
    counts.update(calls_=0, built=0, direct=0)
    with fa.route(model, names):
        general = model(ids).logits
    assert counts["calls_"] == 0 and counts["built"] == 0 and counts["direct"] > 0
    torch.testing.assert_close(general.detach(), got, atol=1e-6, rtol=1e-6)

    # packed segments (the serving engine's step: one row of every request's tokens): the fast and
    # the general path route each token to its own request's adapter alike (attention spans the
    # whole packed row here, as the bare model computes it; the engine gives it per-request blocks)
    lengths = [5, 1, 3, 11, 2, 7, 4]
    packed_ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fa.route(model, names, lengths=lengths):
        packed_fast = model(packed_ids).logits
    counts.update(calls_=0)
    with fa.route(model, names, lengths=lengths):
        packed_general = model(packed_ids).logits
    assert counts["calls_"] == 0
    torch.testing.assert_close(packed_fast, packed_general.detach(), atol=1e-6, rtol=1e-6)


def _on_one_and_two_threads(run):
    """``run()``'s results with torch on one thread and on two (the setting restored after)."""
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(run())
        return outs
    finally:
        torch.set_num_threads(before)


def test_threads_split_groups_without_changing_a_bit(ext):
    """Small groups run in parallel on torch's pool; each group is one task, so the result does not
    depend on the thread count."""
    y0, x, rs, down, up, sz, sc, act = _case(m=600, k=301, n=257, s=7, r=64, sizes=(64, 33, 64, 0, 17, 64, 9),
                                             transposed_up=True, seed=13)
    def run():
        y = y0.clone()
        assert ext.cpu_multi_adapter_(y, x, rs, down, up, sz, sc, act, 10 ** 9) == 0  # all small groups
        return y

    outs = _on_one_and_two_threads(run)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].double(), _ref64((y0, x, rs, down, up, sz, sc, act)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transposed_up", [False, True], ids=["up-NR", "up-RN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_one_call_splits_every_tables_groups_across_threads_without_changing_a_bit(ext, transposed_up, dtype):
    """``cpu_multi_adapter_calls_`` runs the small groups of all its tables (rank buckets) in one
    parallel region, cut into runs of about equal cost: decode-shaped rows (one or two per slot)
    over three buckets of unequal rank give the same bits on one thread and on two, the same as one
    ``cpu_multi_adapter_`` per table, and match the fp64 reference."""
    m, k, n = 45, 133, 71
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=g).to(dtype)
    y0 = torch.randn(m, n, generator=g).to(dtype)
    bucket_of_row = torch.randint(-1, 3, (m,), generator=g)  # each row in at most one bucket
    tables = []
    for b, (s, r, sizes) in enumerate([(5, 8, (8, 3, 8, 8, 0)), (3, 16, (16, 11, 16)), (4, 64, (64, 40, 64, 17))]):
        down = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
        up = (torch.randn(s, n, r, generator=g) / 4).to(dtype)
        if transposed_up:
            up = up.transpose(1, 2).contiguous().transpose(1, 2)
        rs = torch.where(bucket_of_row == b, torch.randint(0, s, (m,), generator=g), -1).to(torch.int32)
        tables.append((rs, down, up, torch.tensor(sizes, dtype=torch.int32), torch.rand(s, generator=g) + 0.5,
                       torch.tensor([ACTS[(i + b) % len(ACTS)] for i in range(s)], dtype=torch.int32)))
    calls = ext.TableCalls(*[list(col) for col in zip(*tables)])
    def run():
        y = y0.clone()
        assert ext.cpu_multi_adapter_calls_(y, x, calls, 10 ** 9) == 0  # all small groups
        return y

    outs = _on_one_and_two_threads(run)
    assert torch.equal(outs[0], outs[1])
    one_by_one = y0.clone()
    for rs, down, up, sz, sc, act in tables:
        ext.cpu_multi_adapter_(one_by_one, x, rs, down, up, sz, sc, act, 10 ** 9)
    assert torch.equal(outs[0], one_by_one)
    want = y0.double()
    for rs, down, up, sz, sc, act in tables:
        want = mo.multi_adapter_ref(want, x.double(), rs, down.double(), up.double(), sz, sc.double(), act)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(outs[0].double(), want, atol=tol, rtol=tol)


def test_leading_dimensions_are_rows(ext):
    """x (..., K) and y (..., N) with the same leading sizes (a layer's (B, T, K) input and output,
    as the router passes them) are the flattened rows, through both entry points; other shapes and
    non-contiguous ones are refused before anything is written."""
    y0, x, rs, down, up, sz, sc, act = _case(m=36, transposed_up=True, seed=3)
    want = y0.clone()
    ext.cpu_multi_adapter_(want, x, rs, down, up, sz, sc, act, 8)
    y3 = y0.clone().view(3, 12, -1)
    ext.cpu_multi_adapter_(y3, x.view(3, 12, -1), rs, down, up, sz, sc, act, 8)
    assert torch.equal(y3.view_as(want), want)
    calls = ext.TableCalls([rs], [down], [up], [sz], [sc], [act])
    y4 = y0.clone().view(2, 3, 6, -1)
    ext.cpu_multi_adapter_calls_(y4, x.view(2, 3, 6, -1), calls, 8)
    assert torch.equal(y4.view_as(want), want)
    y = y0.clone().view(3, 12, -1)
    with pytest.raises(RuntimeError, match=r"same leading sizes, got x \[4, 9, 101\] and y \[3, 12, 75\]"):
        ext.cpu_multi_adapter_calls_(y, x.view(4, 9, -1), calls, 8)
    with pytest.raises(RuntimeError, match="expected contiguous y and x"):
        ext.cpu_multi_adapter_calls_(y.transpose(0, 1), x.view(3, 12, -1).transpose(0, 1), calls, 8)
    assert torch.equal(y, y0.view(3, 12, -1))


def test_status_names_what_is_missing(monkeypatch):
    from fastadapters.ops import cpu_ext

    monkeypatch.setattr(cpu_ext, "_LOADED", None)
    monkeypatch.setattr(cpu_ext, "_FAILED", None)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no C++ compiler ('no-such-compiler-xyz' is not on PATH" in cpu_ext.status()
    with pytest.raises(cpu_ext.CpuExtensionUnavailable, match="no C\\+\\+ compiler"):
        cpu_ext.load_cpu_extension()
    # the failure is remembered: no second attempt, the same reason
    monkeypatch.delenv("CXX")
    with pytest.raises(cpu_ext.CpuExtensionUnavailable, match="no C\\+\\+ compiler"):
        cpu_ext.load_cpu_extension()


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_other_builds_match_the_reference(isa):
    """``FASTADAPTERS_CPU_ISA=generic`` (the build a CPU without AVX2/FMA gets: no instruction-set
    flags) and ``=avx2`` (what an AVX2 CPU without AVX-512 gets, 8-float vectors, when this machine
    builds for AVX-512 by default), each compiled and run here in a fresh process: the fp64
    reference, float32's own loops at every group size and rank, the register tiles, bfloat16's
    decode loops, the NaN isolation, the in-place cases and the thread splits."""
    from fastadapters.ops import cpu_ext

    env = dict(os.environ, **{cpu_ext.ISA_ENV: isa})
    sel = ("matches_fp64_reference or bf16_within_rule or isolation_from_nan or in_place_and_aliased or threads_split "
           "or splits_every or fp32_small_groups or register_tiles or bf16_decode")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", sel], env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
    cpu = cpu_ext.cpu_flags()
    flags = cpu_ext.ISA_FLAGS[isa if isa == "generic" or {"avx2", "fma"} <= cpu else "generic"]
    assert any(cpu_ext._build_path(cpu_ext.FLAGS + flags).glob(f"{cpu_ext.NAME}*.so")), f"the {isa} build was not made"


def test_isa_setting_is_checked(monkeypatch):
    from fastadapters.ops import cpu_ext

    cpu = cpu_ext.cpu_flags()
    monkeypatch.setenv(cpu_ext.ISA_ENV, "generic")
    assert cpu_ext._isa_flags() == []
    monkeypatch.setenv(cpu_ext.ISA_ENV, "avx2")  # AVX2/FMA at most, also on an AVX-512 CPU
    assert cpu_ext._isa_flags() == (["-mavx2", "-mfma"] if {"avx2", "fma"} <= cpu else [])
    monkeypatch.setenv(cpu_ext.ISA_ENV, "auto")
    want = "avx512" if {"avx2", "fma", "avx512f"} <= cpu else "avx2" if {"avx2", "fma"} <= cpu else "generic"
    assert cpu_ext._isa() == want and cpu_ext._isa_flags() == cpu_ext.ISA_FLAGS[want]
    monkeypatch.setenv(cpu_ext.ISA_ENV, "sse9")
    with pytest.raises(cpu_ext.CpuExtensionUnavailable, match="valid: 'auto' .*'avx2' .*'generic'"):
        cpu_ext._isa_flags()
    monkeypatch.setattr(cpu_ext, "_LOADED", None)
    monkeypatch.setattr(cpu_ext, "_FAILED", None)
    assert "FASTADAPTERS_CPU_ISA='sse9'; valid: 'auto', 'avx2' or 'generic'" in cpu_ext.status()
