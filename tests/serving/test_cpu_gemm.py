"""The engine's linears through oneDNN's GEMM on the CPU (``serving/cpu_gemm.py``): only inside the
engine's forward (nothing left on the model after it), only where it applies, numerically a
float32 GEMM (fp64 references), the same greedy tokens and prompt log-probabilities for every
adapter type, and a warned fallback (not a silent one) when the private op is missing."""
from __future__ import annotations

import copy
import pickle
import re
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastadapters as fa
from fastadapters.serving import cpu_gemm
from fastadapters.serving.sampling import SamplingParams
from .real_model import smollm2_dir
from .serve_helpers import assert_no_leaks, greedy_ref, prompts, tiny_engine
from .serve_helpers import one_thread, zoo  # noqa: F401,F811 - fixtures (one_thread is autouse)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

U = 2.0 ** -24  # float32 unit roundoff


def _onednn_calls(fn) -> tuple[object, int]:
    """``fn()``'s result and how many oneDNN linear calls it made (the profiler's count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.fixture
def every_size(monkeypatch):
    """oneDNN for every call (the tiny models' GEMMs are far below MIN_WORK)."""
    monkeypatch.setattr(cpu_gemm, "MIN_WORK", 0)


def _hooked(inp, out, bias=True, seed=0, pack=False, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, bias=bias).to(dtype)
    hooks = cpu_gemm.install(nn.Sequential(layer), pack=pack)
    assert len(hooks) == 1 and "forward" not in layer.__dict__  # nothing on the model until active()
    assert hooks.packed == int(pack)
    return layer, hooks


@pytest.fixture
def weights_seen(monkeypatch):
    """The weights oneDNN's GEMM is called on, in order: "packed" or "row-major" (the once-per-process
    checks of ``install`` made before, not counted)."""
    assert cpu_gemm._op_works(pack=True)
    seen, real = [], cpu_gemm._onednn_linear

    def spy(x, w, b):
        seen.append("packed" if w.is_mkldnn else "row-major")
        return real(x, w, b)

    monkeypatch.setattr(cpu_gemm, "_onednn_linear", spy)
    return seen


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 33, 130])
@pytest.mark.parametrize("shape", [(67, 1001), (333, 333), (1536, 576)])  # odd sizes, and SmolLM2's down_proj
def test_within_the_float32_error_bound_of_an_fp64_reference(every_size, shape, rows, pack, weights_seen):
    """Any float32 GEMM with float32 accumulation, whatever its summation order, errs at most
    gamma_K * (|x| |W|^T + |b|) (gamma_K = K u / (1 - K u)); a reduced-precision or wrong one does not."""
    k, n = shape
    layer, hooks = _hooked(k, n, seed=rows, pack=pack)
    x = torch.randn(2, rows, k)  # 3-D, as a decoder layer calls it
    ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    bound = (k * U / (1 - k * U)) * (x.double().abs() @ layer.weight.double().abs().t() + layer.bias.double().abs())
    with torch.no_grad(), hooks.active():
        y, calls = _onednn_calls(lambda: layer(x))
    assert calls == 1 and y.shape == (2, rows, n) and y.dtype == torch.float32
    assert weights_seen == ["packed" if pack and 2 * rows <= cpu_gemm.PACKED_MAX_ROWS else "row-major"]
    assert ((y.double() - ref).abs() <= bound).all()
    plain = (F.linear(x, layer.weight, layer.bias).double() - ref).abs()
    # the measured gap to MKL's summation order (cpu_gemm's docstring: RMS 1.5-2x at these K)
    assert (y.double() - ref).pow(2).mean().sqrt() <= 3 * plain.pow(2).mean().sqrt()


@pytest.mark.parametrize("rows", [1, 7, 33, 130])
@pytest.mark.parametrize("shape", [(67, 1001), (333, 333), (1536, 576)])
def test_bfloat16_packed_errs_at_most_twice_f_linear(shape, rows, weights_seen):
    k, n = shape
    layer, hooks = _hooked(k, n, seed=rows, pack=True, dtype=torch.bfloat16)
    x = torch.randn(rows, k).bfloat16()
    ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.no_grad():
        plain = F.linear(x, layer.weight, layer.bias)
        with hooks.active():
            y = layer(x)
    assert weights_seen == ["packed"] and y.dtype == torch.bfloat16 and y.shape == (rows, n)
    for stat in (torch.max, torch.mean):
        assert stat((y.double() - ref).abs()) <= 2 * stat((plain.double() - ref).abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_up_to_packed_max_rows_and_the_row_major_weight_above(dtype, weights_seen):
    layer, hooks = _hooked(576, 1536, pack=True, dtype=dtype)
    cap = cpu_gemm.PACKED_MAX_ROWS
    with torch.no_grad(), hooks.active():
        for rows in (1, cap):
            y = layer(torch.randn(rows, 576).to(dtype))
            assert y.shape == (rows, 1536)
        assert weights_seen == ["packed", "packed"]
        x = torch.randn(cap + 1, 576).to(dtype)
        y = layer(x)
    if dtype == torch.float32:  # above the rows where packing pays: oneDNN on the row-major weight
        assert weights_seen[2:] == ["row-major"]
    else:  # bfloat16's F.linear is oneDNN on the row-major weight already
        assert weights_seen[2:] == [] and torch.equal(y, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_changed_or_replaced_is_packed_again_never_served_stale(dtype, weights_seen):
    layer, hooks = _hooked(64, 48, pack=True, dtype=dtype)
    x = torch.randn(5, 64).to(dtype)
    tol = dict(atol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    with torch.no_grad(), hooks.active():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
        layer.weight.mul_(-3.0)  # in place (e.g. an adapter merged into it)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
        layer.weight = nn.Parameter(torch.randn(48, 64).to(dtype), requires_grad=False)  # replaced
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), **tol)
    assert weights_seen == ["packed"] * 3


def test_a_failed_packing_check_hooks_float32_unpacked_with_one_warning(monkeypatch, weights_seen):
    def gone(w):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")

    monkeypatch.setattr(cpu_gemm, "_reorder", gone)
    monkeypatch.setattr(cpu_gemm, "_PACK_CHECKED", None)
    monkeypatch.setattr(cpu_gemm, "_WARNED", set())
    model = nn.Sequential(nn.Linear(576, 1536), nn.Linear(576, 8).bfloat16())
    with pytest.warns(RuntimeWarning, match=re.escape(f"packed linear weights are unavailable on torch {torch.__version__}")):
        hooks = cpu_gemm.install(model, pack=True)
    assert len(hooks) == 1 and hooks.packed == 0  # the float32 layer, as without packing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_gemm.install(model, pack=True).packed == 0  # once
    with torch.no_grad(), hooks.active():
        model[0](torch.randn(32, 576))
    assert weights_seen == ["row-major"]


def test_weight_packing_by_default_only_where_half_the_available_memory_holds_it(monkeypatch):
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 100).bfloat16(), nn.Linear(3, 3).half())
    need = cpu_gemm.packed_bytes(model)
    assert need == 100 * 200 * 4 + 200 * 100 * 2  # float32 and bfloat16 weights once more; float16 is not packed
    monkeypatch.setattr(cpu_gemm, "available_memory", lambda: 2 * need)
    assert cpu_gemm.weight_packing(model, None) is True
    monkeypatch.setattr(cpu_gemm, "available_memory", lambda: 2 * need - 1)
    with pytest.warns(RuntimeWarning, match=r"packing them for oneDNN would take 0\.1 MiB more, over half of the "
                                            r"0\.2 MiB available \(pack them anyway with Engine\(pack_weights=True\) "
                                            r"/ serve --weight-packing on"):
        assert cpu_gemm.weight_packing(model, None) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning either way
        assert cpu_gemm.weight_packing(model, True) is True and cpu_gemm.weight_packing(model, False) is False
    monkeypatch.setattr(cpu_gemm, "available_memory", lambda: None)  # unknown: pack
    assert cpu_gemm.weight_packing(model, None) is True


def test_available_memory_reads_the_system():
    got = cpu_gemm.available_memory()
    assert got is None or 0 < got < 1 << 50


def test_engine_packs_its_linears_and_lm_head_unless_told_not_to(zoo):
    from fastadapters.serving.lm_head import PackedLMHead

    engine = tiny_engine(zoo, max_num_seqs=2)
    hooked = len(engine.onednn_linears)
    assert engine.pack_weights is True and engine.onednn_linears.packed == hooked - 1  # all but the output layer
    assert isinstance(engine.head(), PackedLMHead)
    off = tiny_engine(zoo, max_num_seqs=2, pack_weights=False)
    assert off.pack_weights is False and off.onednn_linears.packed == 0 and len(off.onednn_linears) == hooked
    assert off.head() is off.model.get_output_embeddings()
    ps = prompts([5, 9], seed=2)
    sp = SamplingParams(max_tokens=5, temperature=0)
    names = ["lora_r64", None]
    for e in (engine, off):
        for p, n, r in zip(ps, names, e.generate(ps, sp, names)):
            assert r.output_ids == greedy_ref(e, n, p, sp.max_tokens), n
    with pytest.raises(ValueError, match="pack_weights: got 'yes'; valid: None"):
        tiny_engine(zoo, pack_weights="yes")


def test_f_linear_exactly_outside_the_block_below_the_work_bound_and_under_autograd_or_autocast():
    layer, hooks = _hooked(576, 1536, bias=False)
    x = torch.randn(32, 576)
    want = F.linear(x, layer.weight)
    with torch.no_grad():
        y, calls = _onednn_calls(lambda: layer(x))  # not inside active(): as the model always computed
    assert calls == 0 and torch.equal(y, want)
    with torch.no_grad(), hooks.active():
        y, calls = _onednn_calls(lambda: layer(x[:2]))  # 2 x 576 x 1536 < MIN_WORK: oneDNN's fixed cost loses
        assert calls == 0 and torch.equal(y, F.linear(x[:2], layer.weight))
        y, calls = _onednn_calls(lambda: layer(input=x))  # nn.Linear.forward's keyword
        assert calls == 1 and torch.allclose(y, want, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype, as F.linear gives it
            y, calls = _onednn_calls(lambda: layer(x))
            assert calls == 0 and y.dtype == torch.bfloat16
    with hooks.active():  # autograd records: F.linear, whose gradient is there
        xg = x.clone().requires_grad_()
        y, calls = _onednn_calls(lambda: layer(xg))
        assert calls == 0 and torch.equal(y, want)
        y.sum().backward()
        assert layer.weight.grad is not None
        assert torch.allclose(xg.grad, layer.weight.detach().sum(0).expand_as(x), atol=1e-5)


def test_a_bias_oneDNN_would_misread_takes_f_linear(every_size):
    layer, hooks = _hooked(64, 48)
    x = torch.randn(9, 64)
    with torch.no_grad():
        for b in (torch.randn(48 * 3)[::3], torch.randn(1).expand(48), torch.randn(1)):  # strided, stride 0, broadcast
            layer.bias = nn.Parameter(b, requires_grad=False)
            with hooks.active():
                y, calls = _onednn_calls(lambda: layer(x))
            assert calls == 0 and torch.equal(y, F.linear(x, layer.weight, layer.bias))


def test_the_model_is_as_it_was_after_the_block_even_after_an_error():
    model = nn.Sequential(nn.Linear(576, 1536), nn.ReLU(), nn.Linear(1536, 576))
    hooks = cpu_gemm.install(model)
    assert len(hooks) == 2
    x = torch.randn(32, 576)
    with torch.no_grad():
        want = model(x)
        with pytest.raises(ZeroDivisionError):
            with hooks.active():
                assert isinstance(model[0].__dict__["forward"], cpu_gemm.OneDNNForward)
                assert _onednn_calls(lambda: model(x))[1] == 2
                1 / 0
        assert all("forward" not in m.__dict__ for m in model.modules())
        assert _onednn_calls(lambda: model(x))[1] == 0 and torch.equal(model(x), want)
    scripted = torch.jit.script(model)  # nothing of the hooks is left to trip TorchScript, pickling or a copy
    assert torch.allclose(scripted(x), want)
    twin = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert torch.equal(twin(x), want) and "forward" not in twin[0].__dict__


def test_the_block_is_per_thread():
    layer, hooks = _hooked(576, 1536, bias=False)
    x = torch.randn(32, 576)
    seen = {}

    def other():
        with torch.no_grad():
            seen["calls"] = _onednn_calls(lambda: layer(x))[1]

    with torch.no_grad(), hooks.active():
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert _onednn_calls(lambda: layer(x))[1] == 1
    assert seen["calls"] == 0  # the other thread computes as the model always did


def test_install_takes_plain_float32_cpu_linears_and_nested_blocks_remove_only_their_own():
    class Custom(nn.Linear):
        pass

    own = nn.Linear(4, 4)
    mine = own.forward = lambda x: x  # a forward of its own, set on the instance
    model = nn.Sequential(nn.Linear(4, 8), Custom(8, 8), nn.Linear(8, 8).double(), nn.Linear(8, 8).half(), own,
                          nn.Sequential(nn.Linear(8, 3)))
    hooks = cpu_gemm.install(model)
    assert len(hooks) == 2 and {id(h.module) for h in hooks._hooks} == {id(model[0]), id(model[5][0])}
    with hooks.active():
        with cpu_gemm.install(model).active():  # a second engine's block inside the first's
            assert isinstance(model[0].__dict__["forward"], cpu_gemm.OneDNNForward)
        assert isinstance(model[0].__dict__["forward"], cpu_gemm.OneDNNForward)  # still the outer block's
        assert own.forward is mine and "forward" not in model[1].__dict__
    assert "forward" not in model[0].__dict__ and own.forward is mine


def test_a_missing_op_hooks_nothing_with_one_warning(monkeypatch):
    def gone(*a, **k):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_linear_pointwise'")

    monkeypatch.setattr(cpu_gemm, "_onednn_linear", gone)
    monkeypatch.setattr(cpu_gemm, "_CHECKED", None)
    monkeypatch.setattr(cpu_gemm, "_WARNED", set())
    model = nn.Sequential(nn.Linear(4, 8))
    with pytest.warns(RuntimeWarning, match=re.escape(f"linear op is unavailable on torch {torch.__version__}")):
        assert len(cpu_gemm.install(model)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(cpu_gemm.install(model)) == 0  # once


def test_engine_hooks_its_linears_and_keeps_every_adapter_types_greedy_tokens(zoo, every_size):
    engine = tiny_engine(zoo, max_num_seqs=6)
    assert len(engine.onednn_linears) > 0
    ps = prompts([5, 9, 3, 12, 7, 4], seed=13)
    names = ["lora_r64", None, "houlsby", "parallel", "prefix", "pfeiffer"]
    sp = SamplingParams(max_tokens=6, temperature=0)
    reqs, calls = _onednn_calls(lambda: engine.generate(ps, sp, names))
    assert calls > 0  # and the hooks only in its forward:
    assert not any(isinstance(m.__dict__.get("forward"), cpu_gemm.OneDNNForward) for m in engine.model.modules())
    for p, n, r in zip(ps, names, reqs):  # greedy_ref runs the model outside the engine: F.linear
        assert r.output_ids == greedy_ref(engine, n, p, sp.max_tokens), n
    assert_no_leaks(engine)


@pytest.mark.parametrize("adapter", [None, "lora_r4", "houlsby"])
def test_engine_prompt_logprobs_err_at_most_twice_the_float32_model(zoo, every_size, adapter):
    engine = tiny_engine(zoo, max_num_seqs=2)
    p = prompts([40], seed=5)[0]
    outs = []
    engine.submit(p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), adapter=adapter,
                  on_output=outs.append)
    _, calls = _onednn_calls(engine.run_until_done)
    assert calls > 0
    got = torch.tensor([outs[0].prompt_logprobs[i][1] for i in range(1, len(p))], dtype=torch.float64)
    model = engine.model
    fa.set_adapter(model, None if adapter is None else engine.registry.entries[adapter].internal)
    ids, idx = torch.tensor([p]), torch.tensor(p[1:])
    with torch.no_grad():
        plain = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)[torch.arange(len(p) - 1), idx]
        ref = torch.log_softmax(copy.deepcopy(model).double()(ids).logits[0, :-1], -1)[torch.arange(len(p) - 1), idx]
    assert (got - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-6


def test_real_model_logits_err_at_most_twice_the_float32_model():
    """SmolLM2-135M at its own sizes (every GEMM above MIN_WORK at 64 tokens): the engine's prompt
    log-probabilities against an fp64 copy of the model, beside the plain float32 model's."""
    folder, why = smollm2_dir()
    if folder is None:
        pytest.skip(why)
    from transformers import AutoModelForCausalLM

    from fastadapters.serving.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = Engine(model, max_num_seqs=2, max_model_len=128, num_blocks=16)
    assert len(engine.onednn_linears) == 211  # 30 layers x 7 and the output layer
    assert engine.onednn_linears.packed == 210  # (the output layer is the packed LM head's)
    p = torch.randint(100, 49152, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    outs = []
    engine.submit(p, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), on_output=outs.append)
    _, calls = _onednn_calls(engine.run_until_done)
    assert calls >= 210
    got = torch.tensor([outs[0].prompt_logprobs[i][1] for i in range(1, len(p))], dtype=torch.float64)
    ids, idx, rows = torch.tensor([p]), torch.tensor(p[1:]), torch.arange(len(p) - 1)
    with torch.no_grad():
        plain = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)[rows, idx]
        ref = torch.log_softmax(model.double()(ids).logits[0, :-1], -1)[rows, idx]
    assert (got - ref).abs().max() <= 2 * (plain - ref).abs().max()
