"""Rank slices, reduction splits and launch guards of the Triton kernels, under the interpreter.

The GEMM kernels loop over the rank in 64-wide slices and the row-block kernels run one program
per 64-wide rank slice (issue 12: a whole rank-256 tile asked for more shared memory than a block
may have, and spilled); when row blocks are too few for the GPU the down projection splits K and
the LoRA rank-gradient splits N, adding with relaxed fp32 atomics. Ranks above 64 and forced
splits exercise those paths here at small odd sizes against fp64 (DESIGN.md rule).
"""
import pytest
import torch

from kernel_checks import check_rule
from fastadapters.kernels import bottleneck as BK
from fastadapters.kernels import lora as K
from fastadapters.kernels import multi as KM
from test_triton_bottleneck import dropout_mask as bn_dropout_mask, params, torch_adapter
from test_triton_lora import dropout_mask, make, torch_lora

DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture
def forced_splits(monkeypatch):
    """Split every K / N reduction the launchers may split into (up to) three, as on a GPU whose
    row blocks are too few (on the CPU the launchers never split)."""
    monkeypatch.setattr(K, "_split", lambda total_blocks, programs, device: min(total_blocks, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_lora_rank_above_one_slice(dtype, split, request):
    """r = 100: two rank slices in every kernel (the second one partly padding); optionally K and
    N split three ways with atomics."""
    if split:
        request.getfixturevalue("forced_splits")
    M, Kd, N, r, p, s, seed = 37, 200, 150, 100, 0.1, 0.5, 99
    x, w, b, a, bb = make(M, Kd, N, r, dtype)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(dtype)
    y, S = K.lora_linear_fwd(x, w, b, a, bb, s, p, seed)
    gx, ga, gb = K.lora_linear_bwd(dy, x, w, a, bb, S, s, p, seed)
    mask = dropout_mask(M, Kd, p, seed)
    ref64 = torch_lora(*(t.double() for t in (x, w, b, a, bb)), s, mask, p, dy.double())
    ref_t = torch_lora(x, w, b, a, bb, s, mask, p, dy)
    for name, got, r64, rt in zip(("y", "grad_x", "grad_A", "grad_B"), (y, gx, ga, gb), ref64, ref_t):
        check_rule(f"r={r} split={split} {name}", got, r64, rt)


def test_down_proj_k_split_equals_whole():
    """The K-split down projection adds its partials to the unsplit result (fp32, dropout on)."""
    g = torch.Generator().manual_seed(5)
    x, a = torch.randn(70, 300, generator=g), torch.randn(24, 300, generator=g)
    whole = K.launch_down_proj(x, a, 0.2, 7, k_splits=1)
    for splits in (2, 5):
        torch.testing.assert_close(K.launch_down_proj(x, a, 0.2, 7, k_splits=splits), whole, atol=1e-4, rtol=1e-5)


def test_down_proj_group_k_split_equals_whole():
    """The grouped q/k/v down projection (three members, own seeds, dropout) split over K adds up
    to the unsplit result."""
    from fastadapters.kernels.lora_group import _pad_rows, group_layout, launch_down_proj_group

    g = torch.Generator().manual_seed(12)
    x = torch.randn(45, 200, generator=g)
    As = [torch.randn(r, 200, generator=g) for r in (4, 16, 9)]
    brg = group_layout([a.shape[0] for a in As])
    a_pad = _pad_rows(As, brg, 3 * brg, x.dtype)
    whole = launch_down_proj_group(x, a_pad, brg, 3, 0.1, [1, 2, 3], k_splits=1)
    split = launch_down_proj_group(x, a_pad, brg, 3, 0.1, [1, 2, 3], k_splits=3)
    torch.testing.assert_close(split, whole, atol=1e-4, rtol=1e-5)


def test_rank_grad_n_split_only_for_identity_without_dscale():
    """N is split only where the partial sums can be added (LoRA); the bottleneck's activation and
    learned-scaling gradient take the whole N in one program, so a requested split is ignored."""
    g = torch.Generator().manual_seed(6)
    dy, b, pre = torch.randn(33, 150, generator=g), torch.randn(150, 20, generator=g), torch.randn(33, 20, generator=g)
    one = K.launch_rank_grad(dy, b, pre, 0.5, 0, need_db=True, need_dscale=False, n_splits=1)
    three = K.launch_rank_grad(dy, b, pre, 0.5, 0, need_db=True, need_dscale=False, n_splits=3)
    for u, v in zip(one[:2], three[:2]):
        torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-5)
    act = 3  # gelu, learned scaling: the exact reference
    g3, db3, ds3 = K.launch_rank_grad(dy, b, pre, torch.tensor(0.5), act, need_db=True, need_dscale=True, n_splits=3)
    h = torch.nn.functional.gelu(pre.double())
    dh = dy.double() @ b.double()
    torch.testing.assert_close(ds3.double(), (dh * h).sum(), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(db3.double(), 0.5 * dy.double().t() @ h, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bottleneck_b_above_one_slice_learned_scaling(dtype, forced_splits):
    """b = 100 with gelu and a learned scaling: the scaling gradient sums over rank slices; the
    residual forward splits its output columns (each split rebuilds P)."""
    M, d, b, p, seed = 37, 100, 100, 0.1, 11
    down, up = params(d, d, b, dtype)
    z = torch.randn(M, d, generator=torch.Generator().manual_seed(8)).to(dtype)
    dy = torch.randn(M, d, generator=torch.Generator().manual_seed(9)).to(dtype)
    s = torch.tensor(0.7)
    y, pre = BK.bottleneck_residual_fwd(z, down, up, s, "gelu", p, seed)
    gz, gd, gu, gs = BK.bottleneck_residual_bwd(dy, z, pre, down, up, s, "gelu", p, seed)
    mask = bn_dropout_mask(M, d, p, seed)
    ref64 = torch_adapter(z.double(), down.double(), up.double(), 0.7, "gelu", mask, p, dy.double())
    ref_t = torch_adapter(z, down, up, 0.7, "gelu", mask, p, dy)
    for name, got, r64, rt in zip(("y", "grad_z", "grad_down", "grad_up", "grad_s"), (y, gz, gd, gu, gs), ref64, ref_t):
        check_rule(f"residual b={b} {name}", got.reshape(r64.shape), r64, rt.reshape(r64.shape))


# ---------------------------------------------------------------------------------------------
# multi-adapter kernels
# ---------------------------------------------------------------------------------------------


def _multi_case(m, k, n, s, r, sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(m, n, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    row_slot = torch.randint(-1, s, (m,), generator=g, dtype=torch.int32)
    down = (torch.randn(s, r, k, generator=g) / k**0.5).to(dtype)
    up = (torch.randn(s, n, r, generator=g) / r**0.5).to(dtype)
    sizes = torch.tensor(sizes, dtype=torch.int32)
    scales = torch.rand(s, generator=g) + 0.5
    act_ids = torch.arange(s, dtype=torch.int32) % 6
    return y0, x, row_slot, down, up, sizes, scales, act_ids


def _launch(args, gather):
    from fastadapters.ops.multi import SEGMENT_BLOCK_M, build_plan

    y0, x, row_slot, down, up, sizes, scales, act_ids = args
    plan = build_plan(row_slot, down.shape[0], SEGMENT_BLOCK_M)
    return KM.multi_adapter_launch(y0, x, plan.sorted_rows, plan.seg_start, plan.seg_count, plan.tile_slot,
                                   plan.tile_start, plan.tile_len, down, up, sizes, scales, act_ids,
                                   plan.block_m, gather)


@pytest.mark.parametrize("gather", [False, True], ids=["segmented", "gather"])
@pytest.mark.parametrize("r,sizes", [(40, (40, 7, 0, 33)), (100, (100, 65, 1, 100))])
def test_multi_kernels_rank_slices(r, sizes, gather):
    """R = 40 (one 64-wide shrink slice) and R = 100 (two), adapters of mixed sizes, vs fp64."""
    from fastadapters.ops.multi import multi_adapter_ref

    args = _multi_case(37, 100, 77, 4, r, sizes, torch.float32, seed=r)
    got = _launch(args, gather)
    ref = multi_adapter_ref(*(t.double() if t.is_floating_point() else t for t in args))
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gather", [False, True], ids=["segmented", "gather"])
def test_multi_kernels_clamp_sizes_to_storage(gather):
    """A size above the padded rank R reads no further than R (as the C++ kernel): the result is
    the reference with that size clamped, not a read past the slot."""
    from fastadapters.ops.multi import multi_adapter_ref

    args = list(_multi_case(21, 48, 40, 3, 16, (16, 300, 5), torch.float32, seed=4))
    got = _launch(args, gather)
    args[5] = args[5].clamp(max=16)
    ref = multi_adapter_ref(*(t.double() if t.is_floating_point() else t for t in args))
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_cuda_backend_hands_prefill_to_the_segmented_path():
    """More than CUDA_MAX_ROWS rows: the cuda backend runs the Triton segmented kernels (here under
    the interpreter, on CPU tensors) instead of the C++ decode kernel."""
    from fastadapters.ops import dispatch
    from fastadapters.ops import multi as mo

    if "cuda" not in dispatch._IMPLS.get(mo.OP, {}):
        pytest.skip("the cuda backend of multi_adapter is not registered")
    m = mo.CUDA_MAX_ROWS + 3
    args = _multi_case(m, 24, 20, 3, 8, (8, 3, 5), torch.float32, seed=2)
    called = []
    orig = mo.multi_adapter_triton_op

    def spy(*a, **kw):
        called.append(a[-1])  # the `gather` flag
        return orig(*a, **kw)

    mo.multi_adapter_triton_op, saved = spy, mo.multi_adapter_triton_op
    try:
        got = dispatch._IMPLS[mo.OP]["cuda"](*args)
    finally:
        mo.multi_adapter_triton_op = saved
    assert called == [False], "prefill-sized batch did not take the Triton segmented path"
    ref = mo.multi_adapter_ref(*(t.double() if t.is_floating_point() else t for t in args))
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# launch guards
# ---------------------------------------------------------------------------------------------


def test_device_guard_targets_the_tensors_device():
    """Launches run under the tensors' device (Triton launches on the current one): cuda:1 tensors
    get a guard for device 1; CPU tensors (the interpreter) none."""
    import contextlib

    from fastadapters.kernels._common import device_guard

    assert isinstance(device_guard(torch.zeros(1)), contextlib.nullcontext)
    guard = device_guard(torch.empty(1, device="meta").new_empty(0).to("meta"))
    assert isinstance(guard, contextlib.nullcontext)

    class _FakeCuda:
        device = torch.device("cuda", 1)

    g = device_guard(_FakeCuda())
    assert isinstance(g, torch.cuda.device) and g.idx == 1


def test_lora_too_large_for_int32_takes_torch_path_with_warning(monkeypatch):
    """M x N >= 2**31 (a 128k-vocabulary lm_head over a long batch): the triton backend hands the
    call to the torch path with a warning that says why, instead of raising in the kernel checks.
    The size the backend checks is the largest of x, the weight and y; the verdict at 2**31 is
    checked on the helper (a real 2**31-element tensor is beyond a CPU test)."""
    from fastadapters.ops import lora as ol

    why = ol.triton_unsupported(torch.bfloat16, 16, "rank r", 2**17 * 2**14)
    assert why is not None and "fewer than 2**31 elements" in why and str(2**31) in why
    assert ol.triton_unsupported(torch.bfloat16, 16, "rank r", 2**31 - 1) is None
    seen = []
    orig = ol.triton_unsupported
    monkeypatch.setattr(ol, "triton_unsupported", lambda *a: seen.append(a) or orig(*a))
    x, w, b, a, bb = make(5, 8, 7, 2, torch.float32)
    ol.lora_linear_triton(x, w, b, a, bb, 2.0, 0.0, False)
    assert seen and seen[-1][3] == max(5 * 7, 5 * 8, 7 * 8)
    # past the limit the call runs the torch path, with the reason in a one-time warning
    monkeypatch.setattr(ol, "triton_unsupported", lambda dtype, width, what, elements=0: orig(dtype, width, what, 2**31))
    ol._FALLBACK_WARNED.clear()
    with pytest.warns(RuntimeWarning, match=r"plain torch path.*fewer than 2\*\*31 elements"):
        y = ol.lora_linear_triton(x, w, b, a, bb, 2.0, 0.0, False)
    torch.testing.assert_close(y, ol.lora_linear_torch(x, w, b, a, bb, 2.0, 0.0, False))
