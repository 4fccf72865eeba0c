"""fastadapters.ops.multi: the torch path and the Triton kernels (interpreter) against the fp64
reference, the shared plan, rank-proportional compute, opcheck, bad inputs, offline compile."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastadapters.ops import multi as mo

ACTS = list(mo.ACT_BY_ID)


def _rows(pattern: str, m: int, s: int, g: torch.Generator) -> torch.Tensor:
    """Row slots for a popularity pattern, with base rows (-1) mixed in."""
    if pattern == "distinct":
        r = torch.arange(m) % (s + 1) - 1
    elif pattern == "uniform":
        r = torch.randint(-1, s, (m,), generator=g)
    elif pattern == "skewed":
        r = torch.where(torch.rand(m, generator=g) < 0.7, 2, torch.randint(-1, s, (m,), generator=g))
    elif pattern == "identical":
        r = torch.full((m,), 3)
        r[::5] = -1
    else:
        raise KeyError(pattern)
    return r.to(torch.int32)


def _case(m=37, k=100, n=77, s=7, r=16, dtype=torch.float32, pattern="uniform", seed=0,
          sizes=(1, 5, 16, 0, 4, 8, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    y0 = torch.randn(m, n, generator=g).to(dtype)
    down = (torch.randn(s, r, k, generator=g) / k ** 0.5).to(dtype)
    up = (torch.randn(s, n, r, generator=g) / 4).to(dtype)
    sz = torch.tensor(list(sizes)[:s], dtype=torch.int32)
    scales = torch.rand(s, generator=g) + 0.5
    act = torch.tensor([ACTS[i % len(ACTS)] for i in range(s)], dtype=torch.int32)
    return y0, x, _rows(pattern, m, s, g), down, up, sz, scales, act


def _ref64(args):
    y0, x, rs, down, up, sz, sc, act = args
    return mo.multi_adapter_ref(y0.double(), x.double(), rs, down.double(), up.double(), sz, sc.double(), act)


@pytest.mark.parametrize("pattern", ["distinct", "uniform", "skewed", "identical"])
@pytest.mark.parametrize("m", [1, 37])
def test_torch_path_matches_reference(pattern, m):
    args = _case(m=m, pattern=pattern)
    ref = _ref64(args)
    got = mo.multi_adapter(*args, backend="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # fp64 inputs: the torch path computes in fp64
    got64 = mo.multi_adapter(*[a.double() if a.is_floating_point() else a for a in args], backend="torch")
    torch.testing.assert_close(got64, ref, atol=1e-12, rtol=1e-12)


def test_base_rows_are_untouched_and_padding_is_ignored():
    y0, x, rs, down, up, sz, sc, act = _case(pattern="uniform", seed=3)
    # garbage beyond each adapter's size must not leak (sigmoid(0) = 0.5 would, if unmasked)
    for s in range(down.shape[0]):
        down[s, sz[s]:] = 1e3
        up[s, :, sz[s]:] = float("nan")
    got = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="torch")
    assert torch.isfinite(got).all()
    base = rs < 0
    assert torch.equal(got[base], y0[base])
    zero = rs == 3  # size-0 slot: nothing added
    assert torch.equal(got[zero], y0[zero])
    torch.testing.assert_close(got.double(), _ref64((y0, x, rs, down, up, sz, sc, act)), atol=1e-5, rtol=1e-5)


def test_bf16_within_rule():
    args = _case(pattern="skewed", dtype=torch.bfloat16, seed=5)
    ref = _ref64(args)
    got = mo.multi_adapter(*args, backend="torch")
    ref_t = mo.multi_adapter_ref(*args)  # the plain-torch statement in bf16 storage
    assert got.dtype == torch.bfloat16
    err, err_t = (got.double() - ref).abs().max(), (ref_t.double() - ref).abs().max()
    assert err <= 2 * err_t + 2 ** -7 * ref.abs().max()


def test_compute_follows_sizes_not_padding(monkeypatch):
    """Rank classes: a rank-1 and a rank-4 adapter beside a rank-64 one run rank-1 and rank-4 bmms."""
    y0, x, _, down, up, _, sc, act = _case(s=3, r=64)
    sz = torch.tensor([1, 4, 64], dtype=torch.int32)
    rs = torch.tensor([0, 1, 2, -1] * 4, dtype=torch.int32)
    x, y0 = x[:16], y0[:16]
    seen = []
    real = torch.bmm

    def spy(a, b):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(mo.torch, "bmm", spy)
    got = mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, backend="torch")
    monkeypatch.undo()
    ranks = sorted({b[2] for a, b in seen if b[1] == x.shape[1]})  # shrink: (t, K, c)
    assert ranks == [1, 4, 64], seen
    tiles = sum(a[0] for a, b in seen if b[1] == x.shape[1])
    assert tiles == 3  # one tile per used slot; base rows cost nothing
    torch.testing.assert_close(got.double(), _ref64((y0, x, rs, down, up, sz, sc, act)), atol=1e-5, rtol=1e-5)


def test_plan_static_shapes_and_refill():
    g = torch.Generator().manual_seed(0)
    rs = torch.randint(-1, 5, (37,), generator=g, dtype=torch.int32)
    plan = mo.build_plan(rs, 5, block_m=8)
    assert plan.tile_slot.shape == (mo.max_tiles(37, 5, 8),)
    # every active row appears in exactly one tile of its slot
    seen = []
    for t in range(plan.tile_slot.numel()):
        s = int(plan.tile_slot[t])
        if s < 0:
            assert plan.tile_len[t] == 0
            continue
        rows = plan.sorted_rows[plan.tile_start[t]: plan.tile_start[t] + plan.tile_len[t]]
        assert 1 <= len(rows) <= 8 and bool((rs[rows.long()] == s).all())
        seen += rows.tolist()
    assert sorted(seen) == torch.nonzero(rs >= 0).flatten().tolist()
    for s in range(5):
        seg = plan.sorted_rows[plan.seg_start[s]: plan.seg_start[s] + plan.seg_count[s]]
        assert bool((rs[seg.long()] == s).all()) and len(seg) == int((rs == s).sum())
    # refill in place for another mix (what a replayed CUDA graph needs)
    ptrs = [plan.sorted_rows.data_ptr(), plan.tile_slot.data_ptr()]
    rs2 = torch.full((37,), 4, dtype=torch.int32)
    mo.build_plan(rs2, 5, block_m=8, out=plan)
    fresh = mo.build_plan(rs2, 5, block_m=8)
    assert ptrs == [plan.sorted_rows.data_ptr(), plan.tile_slot.data_ptr()]
    for f in ("sorted_rows", "seg_start", "seg_count", "tile_slot", "tile_start", "tile_len"):
        assert torch.equal(getattr(plan, f), getattr(fresh, f)), f
    with pytest.raises(ValueError, match="another"):
        mo.build_plan(rs2[:5], 5, block_m=8, out=plan)


def test_bad_inputs():
    y0, x, rs, down, up, sz, sc, act = _case()
    call = mo.multi_adapter
    with pytest.raises(ValueError, match=r"expected x of shape \(M, K\), got \(37, 100, 1\)"):
        call(y0, x[..., None], rs, down, up, sz, sc, act)
    with pytest.raises(ValueError, match=r"expected y0 of shape \(37, N\), got \(36, 77\)"):
        call(y0[:36], x, rs, down, up, sz, sc, act)
    with pytest.raises(ValueError, match=r"expected down of shape \(S, R, 100\), got \(7, 16, 99\)"):
        call(y0, x, rs, down[..., :99], up, sz, sc, act)
    with pytest.raises(ValueError, match=r"expected up of shape \(7, 77, 16\), got \(7, 76, 16\)"):
        call(y0, x, rs, down, up[:, :76], sz, sc, act)
    with pytest.raises(ValueError, match=r"expected row_slot of shape \(37\), got \(36,\)"):
        call(y0, x, rs[:36], down, up, sz, sc, act)
    with pytest.raises(ValueError, match=r"expected sizes of shape \(7\)"):
        call(y0, x, rs, down, up, sz[:6], sc, act)
    with pytest.raises(ValueError, match="row_slot: got slot 7; valid: -1 \\(base\\) or 0..6"):
        call(y0, x, torch.full_like(rs, 7), down, up, sz, sc, act)
    with pytest.raises(ValueError, match="row_slot: got slot -2"):
        call(y0, x, torch.full_like(rs, -2), down, up, sz, sc, act)
    with pytest.raises(ValueError, match=r"sizes: got 17; valid: 0..16"):
        call(y0, x, rs, down, up, torch.full_like(sz, 17), sc, act)
    with pytest.raises(ValueError, match=r"act_ids: got 9"):
        call(y0, x, rs, down, up, sz, sc, torch.full_like(act, 9))
    with pytest.raises(ValueError, match="expected row_slot of dtype int32, got torch.float32"):
        call(y0, x, rs.float(), down, up, sz, sc, act)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        call(y0, x, rs, down, up, sz, sc, act, backend="cuda")
    with pytest.raises(ValueError, match="num_slots"):
        mo.build_plan(rs, 0)


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["distinct", "uniform", "skewed", "identical"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
def test_triton_matches_reference(pattern, gather, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    m = 37 if pattern != "identical" else 13
    args = _case(m=m, k=40, n=19, pattern=pattern, seed=11)
    monkeypatch.setattr(mo, "GATHER_MAX_ROWS", 10 ** 6 if gather else 0)
    got = mo.multi_adapter(*args, backend="triton")
    ref = _ref64(args)
    err_t = (mo.multi_adapter_ref(*args).double() - ref).abs().max()
    err = (got.double() - ref).abs().max()
    assert err <= 2 * err_t + 1e-5 * ref.abs().max(), (err, err_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
def test_triton_half_precision_within_rule(dtype, gather, monkeypatch):
    """DESIGN rule: error vs fp64 <= 2x the plain-torch statement's error in that dtype + a floor."""
    args = _case(m=29, k=40, n=19, pattern="skewed", dtype=dtype, seed=17)
    monkeypatch.setattr(mo, "GATHER_MAX_ROWS", 10 ** 6 if gather else 0)
    got = mo.multi_adapter(*args, backend="triton")
    assert got.dtype == dtype
    ref = _ref64(args)
    err_t = (mo.multi_adapter_ref(*args).double() - ref).abs().max()
    err = (got.double() - ref).abs().max()
    floor = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert err <= 2 * err_t + floor * ref.abs().max(), (err, err_t)


def test_triton_one_row_and_rank_one():
    args = _case(m=1, k=33, n=5, s=2, r=5, sizes=(1, 5), pattern="identical")
    args = list(args)
    args[2] = torch.tensor([1], dtype=torch.int32)
    got = mo.multi_adapter(*args, backend="triton")
    torch.testing.assert_close(got.double(), _ref64(args), atol=1e-5, rtol=1e-5)


def test_triton_custom_op_opcheck():
    args = _case(m=9, k=20, n=11, s=3, r=8, sizes=(1, 5, 8), pattern="uniform")
    y0, x, rs, down, up, sz, sc, act = args
    plan = mo.build_plan(rs, 3, mo.SEGMENT_BLOCK_M)
    for gather in (True, False):
        torch.library.opcheck(
            mo.multi_adapter_triton_op,
            (y0, x, plan.sorted_rows, plan.seg_start, plan.seg_count, plan.tile_slot, plan.tile_start,
             plan.tile_len, down, up, sz, sc.float(), act, plan.block_m, gather),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_path_custom_op_opcheck_and_values():
    """The torch path's opaque op (what a compiled routed model calls) equals the reference."""
    for pattern in ("uniform", "distinct"):
        args = _case(m=9, k=20, n=11, s=3, r=8, sizes=(1, 5, 8), pattern=pattern)
        torch.library.opcheck(mo.multi_adapter_torch_op, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        torch.testing.assert_close(mo.multi_adapter_torch_op(*args), mo.multi_adapter_ref(*args),
                                   atol=1e-5, rtol=0)


_COMPILE = r"""
import json, sys, torch
from fastadapters.kernels import multi as km
out = {}
for cc in (80, 90):
    for dtype in (torch.bfloat16,):
        for name, fn, sig, cx, warps in km.shipped_configs(dtype):
            k = km.compile_offline(fn, sig, cx, cc, num_warps=warps)
            ptx = k.asm["ptx"]
            out[f"{name}/sm{cc}/{dtype}"] = {"mma": "mma" in ptx, "wgmma": "wgmma" in ptx}
print(json.dumps(out))
"""


def test_offline_compile_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    from fastadapters.kernels import multi as km

    assert len(out) == 2 * len(km.shipped_configs(torch.bfloat16))
    for key, flags in out.items():
        if key.startswith("seg_"):  # the tl.dot kernels use the tensor cores (wgmma on Hopper)
            assert flags["mma"], key
            assert flags["wgmma"] == ("/sm90/" in key), key


@pytest.mark.parametrize("sizes", [(4, 0, 4, 0, 4, 0, 4), (0,) * 7, (16, 16, 0, 1, 16, 1, 0)])
def test_torch_path_size_zero_tiles(sizes):
    """Slots whose adapter is absent from this table (size 0) beside one or more rank classes."""
    args = _case(pattern="uniform", sizes=sizes, seed=13)
    got = mo.multi_adapter(*args, backend="torch")
    torch.testing.assert_close(got.double(), _ref64(args), atol=1e-5, rtol=1e-5)


def test_cuda_backend_plumbing_on_cpu_reference():
    """The ``cuda`` backend entry (csrc op via fastadapters.ops.cuda_ops) gets the plan's segment
    metadata; on CPU tensors that op runs its reference, so the plumbing is checked here."""
    from fastadapters.ops import dispatch

    impl = dispatch._IMPLS[mo.OP].get("cuda")
    if impl is None:
        pytest.skip("fastadapters.ops.cuda_ops is not importable")
    args = _case(m=23, k=30, n=17, pattern="skewed", seed=2)
    plan = mo.build_plan(args[2], args[3].shape[0])
    got = impl(*args, plan=plan)
    torch.testing.assert_close(got.double(), _ref64(args), atol=1e-5, rtol=1e-5)
    assert "_cuda_meta" in plan.__dict__  # computed once, shared by the next layer
    got2 = impl(*args, plan=plan)
    assert torch.equal(got, got2)


def test_plan_refill_keeps_and_refills_cuda_metadata():
    """build_plan(out=plan) refills the cuda backend's segment metadata in place: a CUDA graph
    captured with those buffers must replay the new mix, not the old one."""
    import torch

    from fastadapters.ops.cuda_ops import multi_adapter_meta
    from fastadapters.ops.multi import build_plan

    s = 4
    first = torch.tensor([0, 1, -1, 1, 3, 0], dtype=torch.int32)
    second = torch.tensor([2, 2, 2, -1, 0, 3], dtype=torch.int32)
    plan = build_plan(first, s)
    meta = plan.__dict__["_cuda_meta"] = multi_adapter_meta(plan.row_slot, s)
    buffers = [t.data_ptr() for t in meta]
    build_plan(second, s, out=plan)
    assert plan.__dict__["_cuda_meta"] is meta
    assert [t.data_ptr() for t in meta] == buffers
    fresh = multi_adapter_meta(second, s)
    assert not torch.equal(fresh.sorted_rows, multi_adapter_meta(first, s).sorted_rows)
    for k, v in fresh._asdict().items():
        assert torch.equal(getattr(meta, k), v), k


def test_torch_path_reuses_gathered_weights_until_a_table_changes():
    """Decode-shaped calls (one tile per slot) keep the gathered, scaled weights on the plan; an
    in-place change of down, up or scales (a slot fill, a reload) is seen at the next call."""
    y0, x, rs, down, up, sz, sc, act = _case(m=6, k=20, n=11, s=6, r=8, sizes=(1, 5, 8, 3, 8, 2),
                                             pattern="distinct")
    plan = mo.build_plan(rs, 6)
    sizes_host, act_host = sz.clone(), act.clone()

    def run():
        return mo.multi_adapter(y0, x, rs, down, up, sz, sc, act, plan=plan, backend="torch",
                                sizes_host=sizes_host, act_host=act_host)
    first = run()
    torch.testing.assert_close(first, mo.multi_adapter_ref(y0, x, rs, down, up, sz, sc, act), atol=1e-5, rtol=0)
    assert plan.__dict__["_gathered"], "decode-shaped calls keep their gathered weights"
    torch.testing.assert_close(run(), first, atol=0, rtol=0)
    for t in (up, down, sc):
        with torch.no_grad():
            t.mul_(1.5)
        torch.testing.assert_close(run(), mo.multi_adapter_ref(y0, x, rs, down, up, sz, sc, act), atol=1e-5, rtol=0)
