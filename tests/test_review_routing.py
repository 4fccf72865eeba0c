"""Review: a ``Router.reroute`` that fails leaves the route as it was.

``reroute`` to a mix that needs more device slots than the store has raises; the router must keep
routing the previous names (its ``names`` included), so that a later forward -- also one after an
adapter was loaded inside the route, which re-assigns the slots from ``names`` -- still runs the
previous mix instead of failing on the refused one.
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from fastadapters.serving import store as store_mod
from tiny_models import input_ids, tiny_model


def _model():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    for name in ("a", "b", "c"):
        fa.patch(model, adapter="lora", r=2, name=name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".lora_B.{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _alone(model, ids, name):
    fa.set_adapter(model, name)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_failed_reroute_keeps_the_previous_names():
    model = _model()
    store_mod.configure(model, max_slots=2)
    ids = input_ids(3, 5)
    names = ["a", None, "b"]
    with torch.no_grad(), fa.route(model, names, backend="torch") as router:
        model(input_ids=ids)
        with pytest.raises(ValueError, match="3 distinct adapters but the store has 2 device slots"):
            router.reroute(["a", "b", "c"])
        assert router.names == names
        out = model(input_ids=ids).logits
        fa.patch(model, adapter="lora", r=2, name="d")  # re-assigns the slots from router.names
        out_after_load = model(input_ids=ids).logits
    for i, n in enumerate(names):
        alone = _alone(model, ids[i:i + 1], n)[0]
        torch.testing.assert_close(out[i], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_after_load[i], alone, atol=1e-5, rtol=0)


def test_route_sees_adapter_weights_replaced_through_data():
    """``p.data = t`` (as dtype conversions and fp16 master-weight code do: ``fastadapters train
    --fp16`` itself) keeps the parameter's version counter: the store compared only the counters,
    so the next ``route`` ran its copies of the old weights."""
    model = _model()
    ids = input_ids(2, 5)
    with torch.no_grad(), fa.route(model, ["a", "b"], backend="torch"):
        model(input_ids=ids)
    g = torch.Generator().manual_seed(7)
    for path, w in model.named_modules():
        if isinstance(w, fa.layers.AdapterLinear) and "a" in w.lora_B:
            w.lora_B["a"].weight.data = torch.randn(w.lora_B["a"].weight.shape, generator=g) * 0.3
    with torch.no_grad(), fa.route(model, ["a", "b"], backend="torch"):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out[0], _alone(model, ids[:1], "a")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], _alone(model, ids[1:], "b")[0], atol=1e-5, rtol=0)
