"""The CUDA C++ ops on a GPU (``pytest -m gpu``; skipped without CUDA): each op against the fp64
reference with the house rule (error vs fp64 at most 2x the error of the plain-torch reference
computed in the same dtype, plus a floor), odd sizes and every popularity pattern, unaligned and
strided inputs (scalar fallback of the 16-byte loads), opcheck, bitwise determinism over many
segments (the producer/consumer hand-off), a side stream, and a CUDA graph replayed with a
different adapter mix than it was captured with.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastadapters.ops import cuda_ops as co

from adapter_cases import PATTERNS, make_row_slot, make_store

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def extension():
    from fastadapters._ext import ExtensionUnavailable, load_extension

    try:
        return load_extension()
    except ExtensionUnavailable as e:
        pytest.fail(f"CUDA is present but the extension does not load: {e}")


def assert_house_rule(got, ref_in_dtype, exact64, what=""):
    """error(got) <= 2 * error(reference in the same dtype) + floor, errors as max |.| vs fp64."""
    err = (got.double() - exact64).abs().max().item()
    err_ref = (ref_in_dtype.double() - exact64).abs().max().item()
    scale = exact64.abs().max().item() + 1e-30
    floor = 1e-5 * scale if got.dtype == torch.float32 else 1e-6 * scale
    assert err <= 2 * err_ref + floor, f"{what}: error {err:.3e} > 2 x {err_ref:.3e} + {floor:.1e}"


def run_case(M, K, N, S, R, sizes, acts, pattern, dtype, seed, x_offset=0):
    gen = torch.Generator().manual_seed(seed)
    down, up, sizes_t, scales, acts_t = make_store(S, R, K, N, dtype, gen, sizes=sizes, acts=acts)
    x_full = torch.randn(M, K + x_offset + 3, generator=gen).to(dtype)
    x = x_full[:, x_offset:x_offset + K]  # x_offset = 1: misaligned rows, row stride K + 4
    y0 = torch.randn(M, N, generator=gen).to(dtype)
    row_slot = make_row_slot(pattern, M, S, 0.2, gen)
    exact = co.multi_adapter_ref(y0.double(), x.double(), row_slot, down.double(), up.double(),
                                 sizes_t, scales, acts_t)
    ref_t = co.multi_adapter_ref(y0, x, row_slot, down, up, sizes_t, scales, acts_t)
    cuda = [t.to(DEV) for t in (y0, x_full, row_slot, down, up, sizes_t, scales, acts_t)]
    y0_d, xf_d, rs_d, down_d, up_d, sizes_d, scales_d, acts_d = cuda
    x_d = xf_d[:, x_offset:x_offset + K]
    y = co.multi_adapter_cuda(y0_d, x_d, rs_d, down_d, up_d, sizes_d, scales_d, acts_d)
    torch.cuda.synchronize()
    assert y.shape == (M, N) and y.dtype == dtype
    assert y.data_ptr() not in (y0_d.data_ptr(), x_d.data_ptr())
    base = row_slot < 0
    assert torch.equal(y.cpu()[base], y0[base]), "base rows must be copied through exactly"
    assert_house_rule(y.cpu(), ref_t, exact, f"{dtype} {pattern} M={M} K={K} N={N}")
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M,K,N", [(1, 100, 77), (37, 100, 77), (64, 1024, 1536)])
def test_multi_adapter_vs_fp64(dtype, pattern, M, K, N):
    # "identical" sends every active row to slot 3 (rank 16): one large segment
    run_case(M, K, N, S=6, R=64, sizes=[1, 5, 64, 16, 0, 33], acts=[0, 0, 1, 3, 4, 5],
             pattern=pattern, dtype=dtype, seed=M * 7 + K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_adapter_unaligned_rows_use_scalar_path(dtype):
    run_case(37, 1024, 264, S=4, R=16, sizes=[16, 5, 1, 8], acts=[0, 2, 3, 5], pattern="uniform",
             dtype=dtype, seed=11, x_offset=1)


def test_multi_adapter_llama_decode_shape():
    # decode, q_proj of a 7B model: 64 rows over 32 adapters of mixed rank, bf16
    run_case(64, 4096, 4096, S=32, R=64, sizes=[[1, 4, 8, 16, 64][i % 5] for i in range(32)],
             acts=[0] * 24 + [1, 2, 3, 4, 5, 1, 3, 4], pattern="skewed", dtype=torch.bfloat16, seed=5)


def test_multi_adapter_deterministic_over_many_segments():
    """Hundreds of segments and K chunks: repeated calls are bitwise equal (no race in the
    producer/consumer hand-off) and match the reference."""
    gen = torch.Generator().manual_seed(21)
    M, K, N, S, R = 512, 2048, 640, 300, 32
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float16, gen)
    x = torch.randn(M, K, generator=gen).half()
    y0 = torch.randn(M, N, generator=gen).half()
    row_slot = make_row_slot("uniform", M, S, 0.1, gen)
    args = [t.to(DEV) for t in (y0, x, row_slot, down, up, sizes, scales, acts)]
    first = co.multi_adapter_cuda(*args)
    for _ in range(20):
        assert torch.equal(co.multi_adapter_cuda(*args), first)
    exact = co.multi_adapter_ref(y0.double(), x.double(), row_slot, down.double(), up.double(),
                                 sizes, scales, acts)
    assert_house_rule(first.cpu(), co.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts),
                      exact, "many segments")


def test_multi_adapter_on_a_side_stream_and_output_placement():
    gen = torch.Generator().manual_seed(8)
    M, K, S, R = 9, 96, 3, 8
    down, up, sizes, scales, acts = make_store(S, R, K, K, torch.float16, gen, sizes=[8, 3, 1],
                                               acts=[1, 3, 5])
    h = torch.randn(M, K, generator=gen).half()
    row_slot = torch.tensor([0, 1, 2, -1, 0, 0, 2, 1, -1], dtype=torch.int32)
    want = co.multi_adapter_ref(h, h, row_slot, down, up, sizes, scales, acts)  # y = h + s f(h)
    args = [t.to(DEV) for t in (row_slot, down, up, sizes, scales, acts)]
    h_d = h.to(DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = co.multi_adapter_cuda(h_d, h_d, *args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(h_d.cpu(), h), "the input must not be modified"
    torch.testing.assert_close(y.cpu(), want, rtol=2e-3, atol=2e-3)


def test_opcheck_cuda():
    gen = torch.Generator().manual_seed(9)
    M, K, N, S, R = 37, 100, 77, 4, 5
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float16, gen, sizes=[1, 5, 0, 3])
    x = torch.randn(M, K, generator=gen).half()
    y0 = torch.randn(M, N, generator=gen).half()
    meta = co.multi_adapter_meta(make_row_slot("skewed", M, S, 0.2, gen), S)
    args = [t.to(DEV) for t in (y0, x, *meta, down, up, sizes, scales, acts)]
    torch.library.opcheck(torch.ops.fastadapters.cuda_multi_adapter, tuple(args))
    bargs = (x.to(DEV), y0.to(DEV), torch.randn(5, K).half().to(DEV), torch.randn(N, 5).half().to(DEV),
             torch.tensor([0.5], device=DEV), 1)
    torch.library.opcheck(torch.ops.fastadapters.cuda_bottleneck_fwd, bargs)


def test_cuda_graph_replay_with_another_mix():
    gen = torch.Generator().manual_seed(10)
    M, K, N, S, R = 32, 256, 200, 8, 16
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.bfloat16, gen,
                                               sizes=[16, 1, 5, 8, 0, 16, 3, 12], acts=[0, 0, 1, 2, 3, 4, 5, 0])
    x = torch.randn(M, K, generator=gen).bfloat16()
    y0 = torch.randn(M, N, generator=gen).bfloat16()
    mix_a = torch.full((M,), 3, dtype=torch.int32)                 # identical
    mix_b = make_row_slot("uniform", M, S, 0.3, gen)               # distinct-ish, base rows
    static = {k: v.to(DEV) for k, v in dict(y0=y0, x=x, row_slot=mix_a, down=down, up=up,
                                           sizes=sizes, scales=scales, act_ids=acts).items()}

    def step():
        return co.multi_adapter_cuda(**static)  # metadata computed inside the graph

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up (allocator, lazy init) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for mix, new_sizes in ((mix_b, None), (mix_a, None), (mix_b, [2, 1, 5, 8, 7, 16, 3, 0])):
        static["row_slot"].copy_(mix.to(DEV))
        if new_sizes is not None:  # a slot reloaded with another rank between replays
            static["sizes"].copy_(torch.tensor(new_sizes, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        sizes_now = static["sizes"].cpu()
        exact = co.multi_adapter_ref(y0.double(), x.double(), mix, down.double(), up.double(),
                                     sizes_now, scales, acts)
        ref_t = co.multi_adapter_ref(y0, x, mix, down, up, sizes_now, scales, acts)
        assert_house_rule(out.cpu(), ref_t, exact, "graph replay")


def test_cuda_graph_with_metadata_refilled_outside():
    """The serving pattern: metadata built once per forward outside the graph, refilled in place
    (multi_adapter_meta(out=...)) for the next mix, the captured op replayed."""
    gen = torch.Generator().manual_seed(12)
    M, K, N, S, R = 16, 128, 96, 5, 8
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float16, gen, sizes=[8, 1, 5, 0, 3])
    x = torch.randn(M, K, generator=gen).half()
    y0 = torch.randn(M, N, generator=gen).half()
    dev_args = [t.to(DEV) for t in (y0, x)]
    store = [t.to(DEV) for t in (down, up, sizes, scales, acts)]
    row_slot = torch.zeros(M, dtype=torch.int32, device=DEV)
    meta = co.multi_adapter_meta(row_slot, S)
    for _ in range(2):
        co.multi_adapter_cuda(*dev_args, row_slot, *store, meta=meta)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = co.multi_adapter_cuda(*dev_args, row_slot, *store, meta=meta)
    for pattern in PATTERNS:
        mix = make_row_slot(pattern, M, S, 0.25, gen)
        row_slot.copy_(mix.to(DEV))
        co.multi_adapter_meta(row_slot, S, out=meta)
        graph.replay()
        torch.cuda.synchronize()
        exact = co.multi_adapter_ref(y0.double(), x.double(), mix, down.double(), up.double(),
                                     sizes, scales, acts)
        ref_t = co.multi_adapter_ref(y0, x, mix, down, up, sizes, scales, acts)
        assert_house_rule(out.cpu(), ref_t, exact, f"graph replay, meta refilled, {pattern}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placement", ["parallel", "output"])
@pytest.mark.parametrize("M", [1, 5, 37])
def test_bottleneck_fwd_vs_fp64(dtype, placement, M):
    gen = torch.Generator().manual_seed(M)
    K = 100 if placement == "parallel" else 96
    N = 77 if placement == "parallel" else K
    b = 5 if M == 5 else 64
    x = torch.randn(M, K, generator=gen).to(dtype)
    down = (torch.randn(b, K, generator=gen) / math.sqrt(K)).to(dtype)
    up = (torch.randn(N, b, generator=gen) / math.sqrt(b)).to(dtype)
    y0 = torch.randn(M, N, generator=gen).to(dtype) if placement == "parallel" else None
    base = x if y0 is None else y0
    scale = torch.tensor([0.8])
    for act in range(6):
        exact = co.bottleneck_fwd_ref(x.double(), base.double(), down.double(), up.double(), scale, act)
        ref_t = co.bottleneck_fwd_ref(x, base, down, up, scale, act)
        y = co.bottleneck_fwd_cuda(x.to(DEV), down.to(DEV), up.to(DEV), scale.to(DEV), act=act,
                                   placement=placement, y0=None if y0 is None else y0.to(DEV))
        assert_house_rule(y.cpu(), ref_t, exact, f"bottleneck {placement} act {act} {dtype}")


def test_checks_reject_bad_cuda_inputs():
    x = torch.zeros(4, 8, device=DEV)
    args = dict(y0=torch.zeros(4, 6, device=DEV), x=x, row_slot=torch.zeros(4, dtype=torch.int32, device=DEV),
                down=torch.zeros(3, 2, 8, device=DEV), up=torch.zeros(3, 6, 2, device=DEV),
                sizes=torch.ones(3, dtype=torch.int32, device=DEV), scales=torch.ones(3, device=DEV),
                act_ids=torch.zeros(3, dtype=torch.int32, device=DEV))
    bad = dict(args, up=args["up"].transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="expected up contiguous"):
        co.multi_adapter_cuda(**bad)
    bad = dict(args, scales=torch.ones(3))
    with pytest.raises(ValueError, match="expected scales on cuda"):
        co.multi_adapter_cuda(**bad)
    x64 = torch.zeros(4, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="expected x of dtype"):
        co.multi_adapter_cuda(**dict(args, x=x64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_backend_agrees_with_triton_backend(dtype, pattern):
    """The same batch through ops.multi with backend="cuda" and backend="triton": both meet the
    house rule against fp64, and they agree with each other to a few output ulps."""
    multi = pytest.importorskip("fastadapters.ops.multi")
    gen = torch.Generator().manual_seed(31)
    M, K, N, S, R = 37, 100, 77, 6, 64
    down, up, sizes, scales, acts = make_store(S, R, K, N, dtype, gen, sizes=[1, 5, 64, 16, 0, 33],
                                               acts=[0, 0, 1, 3, 4, 5])
    x = torch.randn(M, K, generator=gen).to(dtype)
    y0 = torch.randn(M, N, generator=gen).to(dtype)
    row_slot = make_row_slot(pattern, M, S, 0.2, gen)
    exact = co.multi_adapter_ref(y0.double(), x.double(), row_slot, down.double(), up.double(),
                                 sizes, scales, acts)
    ref_t = co.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts)
    args = [t.to(DEV) for t in (y0, x, row_slot, down, up, sizes, scales, acts)]
    outs = {b: multi.multi_adapter(*args, backend=b).cpu() for b in ("cuda", "triton")}
    for b, y in outs.items():
        assert_house_rule(y, ref_t, exact, f"backend {b} {dtype} {pattern}")
    ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    tol = 4 * ulp * exact.abs().max().item()
    assert (outs["cuda"].double() - outs["triton"].double()).abs().max().item() <= tol
