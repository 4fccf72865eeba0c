"""fa.route(model, names, lengths=...): one packed row whose consecutive segments use different adapters.

Every patched linear of a tiny llama carrying the adapter zoo (LoRA ranks 1..64, Houlsby, Pfeiffer,
parallel) gets one packed (1, T, K) input of segments of odd lengths (1, 2, 5, ...); each segment's
output must equal that segment run through the layer with its adapter alone. A (segments, K)
input routes one name per row (the engine's LM-head rows). Bad lengths fail before any compute.
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from fastadapters.patching import _wrappers

from .helpers import ZOO, add_zoo, tiny_llama

ATOL = 1e-5


@pytest.fixture(scope="module")
def zoo_model():
    return add_zoo(tiny_llama())


def _alone(model, layer, x, name):
    fa.set_adapter(model, name)
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("names", [ZOO + [None], ["houlsby", "houlsby", None, "lora_r64", "houlsby"]],
                         ids=["distinct", "repeated"])
def test_packed_segments_equal_each_segment_alone(zoo_model, names):
    model = zoo_model
    lengths = [1 + (3 * i) % 7 for i in range(len(names))]  # 1, 4, 7, 3, 6, 2, ...
    g = torch.Generator().manual_seed(len(names))
    for path, layer in _wrappers(model):
        k = layer.base_layer.in_features
        x = torch.randn(1, sum(lengths), k, generator=g)
        with torch.no_grad(), fa.route(model, names, lengths=lengths):
            packed = layer(x)
            rows = layer(x[0, :len(names)])  # one token per segment
        start = 0
        for i, (name, n) in enumerate(zip(names, lengths)):
            want = _alone(model, layer, x[:, start:start + n], name)
            torch.testing.assert_close(packed[:, start:start + n], want, atol=ATOL, rtol=0, msg=f"{path} seg {i}")
            torch.testing.assert_close(rows[i], _alone(model, layer, x[0, i:i + 1], name)[0], atol=ATOL, rtol=0)
            start += n
    fa.set_adapter(model, ZOO[0])


def test_bad_lengths_fail_before_compute(zoo_model):
    model = zoo_model
    with pytest.raises(ValueError, match="one integer >= 1 per name"):
        with fa.route(model, ["houlsby", None], lengths=[3]):
            pass
    with pytest.raises(ValueError, match="one integer >= 1 per name"):
        with fa.route(model, ["houlsby", None], lengths=[3, 0]):
            pass
    _, layer = next(iter(_wrappers(model)))
    with fa.route(model, ["houlsby", None], lengths=[3, 2]) as router:
        with pytest.raises(ValueError, match="summing to 5"):
            layer(torch.randn(1, 7, layer.base_layer.in_features))
        with pytest.raises(ValueError, match="cannot be rerouted"):
            router.reroute(["houlsby", "houlsby"])
        with pytest.raises(ValueError, match="batch of one row"):
            model(torch.ones(2, 5, dtype=torch.long))


def test_reused_router_routes_the_same_and_follows_adapter_changes():
    model = add_zoo(tiny_llama(), ["lora_r4", "houlsby"])
    _, layer = next(iter(_wrappers(model)))
    x = torch.randn(1, 4, layer.base_layer.in_features, generator=torch.Generator().manual_seed(3))
    names, lengths = ["lora_r4", None, "houlsby"], [1, 1, 2]
    with torch.no_grad():
        with fa.route(model, names, lengths=lengths) as first:
            want = layer(x)
        with fa.route(model, names, lengths=lengths, reuse=first) as again:
            assert again is first and torch.equal(layer(x), want)
        other_names, other_lengths = ["houlsby", None, "lora_r4"], [2, 1, 1]
        with fa.route(model, other_names, lengths=other_lengths) as fresh:
            want_other = layer(x)
        with fa.route(model, other_names, lengths=other_lengths, reuse=first) as other:
            # other names and lengths (a request joined / left): the same router, repacked in place
            assert other is first and torch.equal(layer(x), want_other)
        assert fresh is not first
        with torch.no_grad():  # the adapter's weights change in place: a new route's full sync follows
            for p in layer.lora_B["lora_r4"].parameters():
                p.mul_(2)
        with fa.route(model, names, lengths=lengths):
            changed = layer(x)
        with fa.route(model, names, lengths=lengths, reuse=first) as again:  # and the reused one, after it
            assert again is first and torch.equal(layer(x), changed)
        assert not torch.equal(changed[:, :1], want[:, :1]) and torch.equal(changed[:, 1:], want[:, 1:])
