"""Base linears with their own forward (bitsandbytes' 4/8-bit layers subclass nn.Linear and
override forward; here a fake-quantised stand-in): the kernels must not read their weight, so
adapters run beside ``base_layer(x)`` on the torch path, with one warning that says so."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fastadapters as fa
from fastadapters import layers
from fastadapters.ops import dispatch
from tiny_models import input_ids, tiny_model


class FakeQuantLinear(nn.Linear):
    """Multiplies by its weight rounded to a 1/8 grid: not what ``.weight`` holds."""

    def forward(self, x):
        return nn.functional.linear(x, torch.round(self.weight * 8) / 8, self.bias)


class PlainSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward: still fusable."""


def _swap(model, cls, names=("q_proj", "v_proj", "down_proj")):
    for path, mod in list(model.named_modules()):
        if path.rsplit(".", 1)[-1] in names and type(mod) is nn.Linear:
            new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None)
            new.load_state_dict(mod.state_dict())
            parent = model.get_submodule(path.rsplit(".", 1)[0])
            setattr(parent, path.rsplit(".", 1)[1], new)
    return model


def _branch_reference(model, kind, fields):
    """The patched model's logits restated: every wrapped layer = base_layer(x) + the adapter formula."""
    ids = input_ids()
    ref = []

    def hook(mod, args, out):
        x = args[0]
        name = mod.active_adapter
        spec = mod.specs[name]
        if spec.kind == "lora":
            A, B = mod.lora_A[name].weight, mod.lora_B[name].weight
            return mod.base_layer(x) + spec.scaling * (x @ A.t() @ B.t())
        D, U = mod.adapter_down[name].weight, mod.adapter_up[name].weight
        act = {"tanh": torch.tanh, "relu": torch.relu}[spec.config.non_linearity]
        f = lambda z: act(z @ D.t()) @ U.t() * mod.scaling_of(name)  # noqa: E731
        if spec.kind == "mh":
            return mod.base_layer(x + f(x))
        if spec.kind == "output":
            h = mod.base_layer(x)
            return h + f(h)
        return mod.base_layer(x) + f(x)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers.AdapterLinear)]
    try:
        with torch.no_grad():
            ref = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return ref


@pytest.mark.parametrize("fields", [dict(adapter="lora", r=4, target_modules=["q_proj", "v_proj"]),
                                    dict(adapter="series", bottleneck_size=4, non_linearity="tanh",
                                         target_modules=["q_proj", "down_proj"]),
                                    dict(adapter="parallel", bottleneck_size=4, non_linearity="relu",
                                         target_modules=["q_proj", "v_proj"])],
                         ids=["lora", "series", "parallel"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opaque_base_runs_beside_its_forward(fields, backend):
    model = _swap(tiny_model("llama"), FakeQuantLinear)
    dispatch._WARNED.discard(("adapter_linear", "FakeQuantLinear"))
    with pytest.warns(RuntimeWarning, match="FakeQuantLinear has its own forward"):
        fa.patch(model, backend=backend, **fields)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("lora_B" in n or "adapter_up" in n):
                p.normal_(0, 0.1)
    wrapped = [m for m in model.modules() if isinstance(m, layers.AdapterLinear)]
    assert wrapped and not any(m.fusable for m in wrapped)
    with torch.no_grad():
        got = model(input_ids()).logits
    torch.testing.assert_close(got, _branch_reference(model, fields["adapter"], fields), atol=1e-5, rtol=1e-5)
    # the fused path would have multiplied by the unrounded weight: really a different answer
    fa.set_backend(model, "torch")  # (the triton request was ignored above: no kernels here)
    for m in wrapped:
        m.fusable = True
    with torch.no_grad():
        assert (model(input_ids()).logits - got).abs().max() > 1e-4
    # training: gradients reach the adapters through the opaque base
    for m in wrapped:
        m.fusable = False
    model.train()
    loss = model(input_ids=input_ids(), labels=input_ids()).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_subclass_keeping_the_linear_forward_stays_fused():
    model = _swap(tiny_model("llama"), PlainSubclass)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.patch(model, adapter="lora", r=4, target_modules=["q_proj", "v_proj"])
    assert all(m.fusable for m in model.modules() if isinstance(m, layers.AdapterLinear))
