"""GPU checks of the multi-adapter kernels (skipped without CUDA): Triton on the device against
the fp64 reference, a CUDA graph captured for one adapter mix and replayed for another, a
routed model in bf16 with the Triton backend, and (with flashinfer) the engine's decode steps from
CUDA graphs against its eager steps."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fastadapters.ops import multi as mo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _case(m, k, n, s, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    y0 = torch.randn(m, n, generator=g)
    down = torch.randn(s, r, k, generator=g) / k ** 0.5
    up = torch.randn(s, n, r, generator=g) / 4
    sizes = torch.tensor([(1, 5, 16, 0, 4, 64, 3, 8)[i % 8] for i in range(s)], dtype=torch.int32).clamp(max=r)
    scales = torch.rand(s, generator=g) + 0.5
    act = torch.arange(s, dtype=torch.int32) % 6
    cuda = lambda t, dt=None: t.to("cuda", dt) if dt is not None else t.to("cuda")  # noqa: E731
    return (cuda(y0, dtype), cuda(x, dtype), None, cuda(down, dtype), cuda(up, dtype), cuda(sizes), cuda(scales),
            cuda(act))


def _ref(y0, x, rs, down, up, sizes, scales, act):
    d = lambda t: t.double().cpu()  # noqa: E731
    return mo.multi_adapter_ref(d(y0), d(x), rs.cpu(), d(down), d(up), sizes.cpu(), d(scales), act.cpu())


def _check(got, args, rs):
    y0, x, _, down, up, sizes, scales, act = args
    ref = _ref(y0, x, rs, down, up, sizes, scales, act)
    ref_t = mo.multi_adapter_ref(y0.cpu(), x.cpu(), rs.cpu(), down.cpu(), up.cpu(), sizes.cpu(), scales.cpu(), act.cpu())
    err = (got.double().cpu() - ref).abs().max()
    err_t = (ref_t.double() - ref).abs().max()
    floor = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[got.dtype]
    assert err <= 2 * err_t + floor * ref.abs().max(), (err, err_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 37, 64, 300])
def test_triton_on_cuda(dtype, m):
    args = list(_case(m, 4096 if m <= 64 else 1000, 1000, 8, 64, dtype))
    rs = torch.randint(-1, 8, (m,), dtype=torch.int32, device="cuda")
    args[2] = rs
    got = mo.multi_adapter(*args, backend="triton")
    _check(got, args, rs)


@pytest.mark.parametrize("m", [16, 512])  # gather path, segmented path
def test_cuda_graph_replayed_for_another_mix(m):
    args = list(_case(m, 512, 384, 8, 64, torch.bfloat16, seed=1))
    y0, x, _, down, up, sizes, scales, act = args
    rs1 = torch.randint(-1, 8, (m,), dtype=torch.int32, device="cuda")
    rs2 = torch.full((m,), 5, dtype=torch.int32, device="cuda")
    rs2[::3] = -1
    rs2[1::7] = 0
    plan = mo.build_plan(rs1, 8, mo.SEGMENT_BLOCK_M)
    run = lambda: mo.multi_adapter_triton(y0, x, plan.row_slot, down, up, sizes, scales, act, plan=plan)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    _check(out, args, rs1)
    mo.build_plan(rs2, 8, mo.SEGMENT_BLOCK_M, out=plan)  # same buffers, new mix
    graph.replay()
    _check(out, args, rs2)


def test_routed_model_bf16_triton():
    import fastadapters as fa
    from fastadapters.serving import store as store_mod

    from .helpers import VOCAB, add_zoo, tiny_llama

    model = add_zoo(tiny_llama(hidden=128)).to("cuda", torch.bfloat16)
    store_mod.configure(model, dtype=torch.bfloat16)
    names = ["lora_r64", None, "houlsby", "lora_r1", "parallel", "pfeiffer", "lora_r16", "lora_r4"]
    ids = torch.randint(2, VOCAB, (len(names), 9), device="cuda")
    with torch.no_grad():
        with fa.route(model, names, backend="torch"):
            ref = model(ids).logits.float()
        with fa.route(model, names, backend="triton"):
            got = model(ids).logits.float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("attention,dtype", [
    ("sdpa", torch.float32),
    ("sdpa", torch.bfloat16),
    pytest.param("flashinfer", torch.bfloat16, marks=pytest.mark.skipif(
        importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer-python"))])
def test_engine_decode_steps_from_cuda_graphs_equal_eager(tmp_path, attention, dtype):
    """Issue 19 item 7 on a real GPU: decode steps replayed from CUDA graphs (SDPA's padded decode
    batch or FlashInfer attention, Triton/CUDA multi-adapter kernels, a shrinking batch through
    several padded sizes, four adapter types mixed) against the eager engine, in lockstep: every
    step's logits agree (fp32: 1e-4 relative; bf16: 2^-6, the graph's kernels may tile differently)
    until the two first pick different tokens (a near-tie), and in fp32 every token agrees."""
    import fastadapters as fa
    from fastadapters.serving.engine import Engine
    from fastadapters.serving.sampling import SamplingParams

    from .helpers import VOCAB, add_zoo, tiny_llama

    names = ["lora_r4", "lora_r16", "houlsby", "parallel"]
    src = add_zoo(tiny_llama(hidden=256), names)  # head_dim 64: a size FlashInfer's kernels take
    paths = {n: fa.save_adapter(src, str(tmp_path / n), name=n) for n in names}
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 3, 12, 8)]

    def engine(graphs):
        eng = Engine(tiny_llama(hidden=256).to("cuda", dtype), attention_backend=attention,
                     cuda_graphs=graphs, max_num_seqs=8, block_size=16)
        for n, p in paths.items():
            eng.load_adapter(n, p, confined=False)
        seen = []
        take = eng._take_tokens

        def record(batch, logits):
            seen.append(logits.float().cpu())
            return take(batch, logits)

        eng._take_tokens = record
        reqs = [eng.submit(p, SamplingParams(max_tokens=4 + 6 * i, temperature=0),
                           adapter=(names + [None])[i % 5]) for i, p in enumerate(prompts)]
        return eng, reqs, seen

    graph, greqs, glog = engine(True)
    eager, ereqs, elog = engine(False)
    tol = 1e-4 if dtype == torch.float32 else 2 ** -6
    compared = 0  # graph steps whose logits were compared
    while True:  # no EOS (the tiny model has none), fixed max_tokens: both schedule the same steps
        before = graph.stats["graph_steps"]
        a, b = graph.step(), eager.step()
        assert a == b
        if not a:
            break
        if [r.output_ids for r in greqs] != [r.output_ids for r in ereqs]:
            break  # a near-tie went the other way: later inputs differ
        x, y = glog[-1], elog[-1]
        assert (x - y).abs().max() <= tol * y.abs().max(), (compared, (x - y).abs().max())
        compared += graph.stats["graph_steps"] > before
    if dtype == torch.float32:
        graph.run_until_done()
        eager.run_until_done()
        assert [r.output_ids for r in greqs] == [r.output_ids for r in ereqs]
    st = graph._graphs.stats
    assert compared >= 1 and st["captures"] >= 2 and st["replays"] > st["captures"]
