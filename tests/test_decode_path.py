"""The direct torch path of ``AdapterLinear`` (decode overhead, issue 11 item 5) equals the full path.

Where the backend resolves to plain torch, ``AdapterLinear.forward`` calls the torch implementation
straight (no ModuleDict lookups through ``__getattr__``, no shape checks past x's width, no backend
dispatch), and ``lora_linear_torch`` skips its ``autograd.Function`` when no input needs a
gradient. These tests check that the direct path is the one taken (the dispatcher and the Function
are not called), that it gives the very bits of the full path (``forward_adapter`` with autograd
on) for LoRA, series (Houlsby: mh and output placements, learned scaling) and parallel adapters,
with biases and gpt2's Conv1D, in eval with dropout configured and in training with dropout under
no_grad; that it is within fp32 rounding of the fp64 reference; that gradients through it are the
full path's; and that bad input still gets the full path's error.
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from fastadapters.layers import AdapterLinear
from fastadapters.ops import dispatch
from fastadapters.ops import lora as lora_ops
from fastadapters.ops.bottleneck import bottleneck_linear_ref
from fastadapters.ops.lora import lora_linear, lora_linear_ref
from tiny_models import input_ids, tiny_model

ADAPTERS = {
    "lora": dict(adapter="lora", r=5, alpha=10, dropout=0.1),
    "series": dict(adapter="series", variant="houlsby", bottleneck_size=3, non_linearity="tanh",
                   scaling="learned", dropout=0.1),
    "parallel": dict(adapter="parallel", bottleneck_size=5, non_linearity="relu", dropout=0.1),
}
# (arch, adapter, extra patch fields): every adapter type on llama (no bias); biases (opt) and
# gpt2's Conv1D (weight stored (in, out), with a bias) for LoRA and a bottleneck adapter
CASES = [("llama", "lora", {}), ("llama", "series", {}), ("llama", "parallel", {}),
         ("gpt2", "lora", dict(target_modules=["c_attn", "c_fc"])), ("opt", "series", {}),
         ("gpt2", "parallel", dict(target_modules=["c_attn"]))]
CASE_IDS = [f"{a}-{k}" for a, k, _ in CASES]


def _patched(arch, kind, extra, seed=0):
    model = tiny_model(arch, seed=seed)
    fa.patch(model, **ADAPTERS[kind], **extra)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # LoRA's B starts at zero: give every adapter weight a visible effect
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _layers(model):
    layers = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    assert layers, "nothing patched"
    return layers


@pytest.fixture
def spies(monkeypatch):
    """Counts of calls to the dispatcher and to the LoRA autograd.Function."""
    counts = {"dispatch": 0, "function": 0}
    real_call, real_apply = dispatch.call, lora_ops._LoRALinearTorch.apply

    def call(*a, **k):
        counts["dispatch"] += 1
        return real_call(*a, **k)

    def apply(*a, **k):
        counts["function"] += 1
        return real_apply(*a, **k)

    monkeypatch.setattr(dispatch, "call", call)
    monkeypatch.setattr(lora_ops._LoRALinearTorch, "apply", apply)
    return counts


def _fp64_reference(layer, x):
    """The layer's adapter by the ops' ``*_ref`` functions, in fp64 (eval: no dropout)."""
    name = layer.active_adapter
    spec = layer.specs[name]
    w, b = (t.double() if t is not None else None for t in layer._base_args())
    x = x.double()
    if spec.kind == "lora":
        return lora_linear_ref(x, w, b, layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double(),
                               spec.scaling)
    s = layer.scaling_of(name)
    s = s.double() if isinstance(s, torch.Tensor) else s
    return bottleneck_linear_ref(spec.kind, x, w, b, layer.adapter_down[name].weight.double(),
                                 layer.adapter_up[name].weight.double(), s, spec.config.non_linearity)


@pytest.mark.parametrize("arch,kind,extra", CASES, ids=CASE_IDS)
def test_direct_path_is_taken_and_equals_full_path_in_eval(arch, kind, extra, spies):
    model = _patched(arch, kind, extra).eval()
    g = torch.Generator().manual_seed(3)
    for layer in _layers(model):
        for shape in ((1, layer.in_features), (2, 3, layer.in_features), (37, layer.in_features)):
            x = torch.randn(shape, generator=g)
            spies.update(dispatch=0, function=0)
            with torch.no_grad():
                y_direct = layer(x)
            with torch.inference_mode():
                y_inference = layer(x)
            assert spies == {"dispatch": 0, "function": 0}, "the direct path was not taken"
            y_full = layer.forward_adapter(x, layer.active_adapter)  # grad on: dispatcher (+ Function)
            assert spies["dispatch"] == 1 and spies["function"] == (1 if kind == "lora" else 0)
            assert y_full.requires_grad and not y_direct.requires_grad
            assert torch.equal(y_direct, y_full.detach()), f"{layer}: direct path differs from the full path"
            assert torch.equal(y_inference, y_direct)
            ref = _fp64_reference(layer, x)
            torch.testing.assert_close(y_direct.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_direct_path_keeps_training_dropout_under_no_grad(kind, spies):
    """Training mode under no_grad (e.g. a sampling step inside a training loop): the same mask as
    the full path from the same seed, so dropout is applied, and applied identically."""
    model = _patched("llama", kind, {}).train()
    layer = _layers(model)[0]
    x = torch.randn(9, layer.in_features)
    torch.manual_seed(11)
    with torch.no_grad():
        y_direct = layer(x)
    assert spies["dispatch"] == 0
    torch.manual_seed(11)
    y_full = layer.forward_adapter(x, layer.active_adapter)
    assert torch.equal(y_direct, y_full.detach())
    with torch.no_grad():
        y_eval = layer.eval()(x)
    assert not torch.equal(y_direct, y_eval), "dropout 0.1 on 9x32 inputs changed nothing"


@pytest.mark.parametrize("arch,kind,extra", [CASES[0], CASES[1], CASES[2], CASES[3]], ids=CASE_IDS[:4])
def test_model_logits_generation_and_gradients_match_full_path(arch, kind, extra, monkeypatch):
    """Whole model: no_grad logits, greedy generation and training gradients with the direct path
    equal those with it switched off (every layer through ``forward_adapter``)."""
    model = _patched(arch, kind, extra)
    ids = input_ids(batch=2, length=7)

    def run():
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.train()
        model.zero_grad()
        torch.manual_seed(5)  # dropout 0.1 in training: the same masks both times
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logits, gen, grads

    direct = run()
    monkeypatch.setattr(AdapterLinear, "_forward_direct", lambda self, x, name, spec: None)
    full = run()
    assert torch.equal(direct[0], full[0])
    assert torch.equal(direct[1], full[1])
    assert len(direct[2]) == len(full[2]) > 0
    for a, b in zip(direct[2], full[2]):
        assert torch.equal(a, b)


def test_bad_input_still_gets_the_full_paths_error(monkeypatch):
    model = _patched("llama", "lora", {}).eval()
    layer = _layers(model)[0]
    with torch.no_grad(), pytest.raises(ValueError, match=r"expected x of shape \(\*, 32\), got \(2, 31\)"):
        layer(torch.randn(2, 31))
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")  # a backend that cannot run here: said, not bypassed
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot run lora_linear with backend='cuda'"):
        layer(torch.randn(2, 32))
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with torch.no_grad(), pytest.raises(ValueError, match="is not a backend"):
        layer(torch.randn(2, 32))


@pytest.mark.parametrize("frozen", [False, True])
def test_lora_op_skips_autograd_function_only_when_no_input_needs_grad(frozen, spies):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 100, generator=g)
    w, b = torch.randn(77, 100, generator=g), torch.randn(77, generator=g)
    A, B = torch.randn(3, 100, generator=g), torch.randn(77, 3, generator=g)
    if not frozen:
        A.requires_grad_()
        B.requires_grad_()
    y = lora_linear(x, w, b, A, B, 1.5)
    assert spies["function"] == (0 if frozen else 1) and (y.grad_fn is not None) == (not frozen)
    with torch.no_grad():
        y_nograd = lora_linear(x, w, b, A, B, 1.5)
    assert spies["function"] == (0 if frozen else 1)
    assert torch.equal(y_nograd, y.detach())
    ref = lora_linear_ref(x.double(), w.double(), b.double(), A.double(), B.double(), 1.5)
    torch.testing.assert_close(y_nograd.double(), ref, atol=1e-4, rtol=1e-5)


def test_compiled_no_grad_forward_has_no_graph_break():
    """torch.compile(fullgraph=True) of a patched model's no_grad forward on the torch backend (the
    direct path stands aside while compiling; the op then runs without its Function) equals eager."""
    model = _patched("llama", "lora", {}).eval()
    ids = input_ids(batch=2, length=5)

    def fwd(ids):
        return model(input_ids=ids).logits

    with torch.no_grad():
        eager = fwd(ids)
        compiled = torch.compile(fwd, fullgraph=True, backend="eager")(ids)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
