"""Review: adapter names that collide with attributes of the containers the adapter weights live in.

Adapter weights sit in ``nn.ModuleDict`` / ``nn.ParameterDict`` entries keyed by the adapter name;
torch refuses a key that is already an attribute of the container ("update", "values", "training",
"forward", ...). ``patch`` must refuse such a name up front, with a ValueError that says what is
valid, and leave the model as it was -- not raise a KeyError half-way through wrapping modules.
"""
from __future__ import annotations

import pytest

import fastadapters as fa
from tiny_models import assert_state_identical, snapshot, tiny_model


def _types(model):
    return {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("adapter,fields", [
    ("lora", dict(r=2)),
    ("series", dict(bottleneck_size=4, scaling="learned")),
    ("prefix", dict(num_virtual_tokens=2)),
])
@pytest.mark.parametrize("name", ["update", "values", "training", "forward"])
def test_container_attribute_names_are_refused_before_any_change(adapter, fields, name):
    model = tiny_model("llama")
    before, types = snapshot(model), _types(model)
    with pytest.raises(ValueError, match=rf"name: got '{name}'; valid"):
        fa.patch(model, adapter=adapter, name=name, **fields)
    assert "_fastadapters" not in model.__dict__ and "forward" not in model.__dict__
    assert _types(model) == types
    assert_state_identical(before, snapshot(model))


def test_second_adapter_with_container_attribute_name_changes_nothing():
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", r=2)
    before, types = snapshot(model), _types(model)
    with pytest.raises(ValueError, match=r"name: got 'keys'; valid"):
        fa.patch(model, adapter="parallel", bottleneck_size=4, name="keys")
    assert fa.adapter_names(model) == ["default"]
    assert _types(model) == types
    assert_state_identical(before, snapshot(model))
    fa.unpatch(model)  # still a consistent patch state
