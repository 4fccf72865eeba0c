"""Review: removing the last prefix adapter puts back an instance-level ``forward`` it wrapped.

A model instance can carry its own ``forward`` (accelerate's ``add_hook_to_module`` -- used by
``device_map`` dispatch and CPU offload -- replaces ``model.forward`` on the instance). A first
``patch(adapter="prefix")`` wraps that forward; ``unpatch`` and ``delete_adapter`` of the last prefix
adapter must then give exactly that forward back, not drop it (which silently removes the hook).
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from tiny_models import input_ids, tiny_model


def _hooked_model():
    model = tiny_model("llama")
    cls_forward = type(model).forward
    calls = []

    def hooked_forward(*args, **kwargs):  # what a pre/post hook on the instance looks like
        calls.append(1)
        return cls_forward(model, *args, **kwargs)

    model.forward = hooked_forward
    return model, hooked_forward, calls


@pytest.mark.parametrize("remove", ["unpatch", "delete_prefix"])
def test_instance_forward_is_restored(remove):
    model, hooked, calls = _hooked_model()
    fa.patch(model, adapter="prefix", num_virtual_tokens=2, name="pre")
    if remove == "delete_prefix":
        fa.patch(model, adapter="lora", r=2, name="lo")
    with torch.no_grad():
        model(input_ids=input_ids(1, 4))
    assert calls, "the prefix wrapper calls the instance forward"
    if remove == "unpatch":
        fa.unpatch(model)
    else:
        fa.delete_adapter(model, "pre")
        assert fa.adapter_names(model) == ["lo"]
    assert model.__dict__.get("forward") is hooked
    calls.clear()
    with torch.no_grad():
        model(input_ids=input_ids(1, 4))
    assert calls == [1]
