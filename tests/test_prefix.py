"""Prefix-tuning through the KV cache on every supported architecture.

The prefix enters as P past positions of each layer's cache. Checks:
- exactness: a prefix set to the base model's own cache of P real tokens makes the prefixed model
  give the base model's logits on (those P tokens + the input), the independent meaning of
  "P past positions";
- training: the loss backpropagates into the prefix and nowhere into the frozen base;
- generation: greedy ``generate`` with the cache equals a cache-free greedy loop, also for a
  left-padded batch (each row must equal its prompt generated alone), and beam search with the
  cache equals beam search without it; ``prefix_projection=True`` works the same way.
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from tiny_models import ARCHS, LAYERS, assert_state_identical, input_ids, snapshot, tiny_model

P = 3


def prefixed(arch, **kw):
    model = tiny_model(arch)
    fa.patch(model, adapter="prefix", num_virtual_tokens=P, **kw)
    enc = model.fastadapters_prefix["default"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a prefix large enough to change the outputs clearly
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 2 and enc.transform is None else 0.5))
    return model


def greedy_no_cache(model, ids, steps, attention_mask=None):
    """Greedy decoding by re-running the whole sequence each step (no cache anywhere)."""
    seq = ids
    for _ in range(steps):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False, **kw).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(seq.shape[0], 1)], dim=1)
    return seq


def _kv_layers(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_equals_real_past_tokens(arch):
    """Prefix := the base model's cache of P real tokens  =>  logits == base(real tokens + input)."""
    model = tiny_model(arch)
    base = tiny_model(arch)
    pre = input_ids(1, P, seed=5)
    ids = input_ids(1, 6, seed=6)
    with torch.no_grad():
        out = base(input_ids=pre, use_cache=True)
        expected = base(input_ids=torch.cat([pre, ids], 1), use_cache=False).logits[:, P:]
    layers = _kv_layers(out.past_key_values)
    assert len(layers) == LAYERS
    fa.patch(model, adapter="prefix", num_virtual_tokens=P)
    enc = model.fastadapters_prefix["default"]
    # PEFT's flat layout: per virtual token, layer-major, key before value, then heads, then dims
    flat = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])  # (L, 2, H, P, D)
    flat = flat.permute(3, 0, 1, 2, 4).reshape(P, -1)
    with torch.no_grad():
        enc.embedding.weight.copy_(flat)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_trains_and_generates(arch):
    model = prefixed(arch)
    enc = model.fastadapters_prefix["default"]
    ids = input_ids(2, 5)

    # the prefix changes the outputs
    base = tiny_model(arch)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)

    # training: gradient into the prefix only
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    g = enc.embedding.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "fastadapters_prefix" not in n)
    model.eval()

    # use_cache=False hands no cache back (generate would feed it back with the whole sequence)
    with torch.no_grad():
        assert model(input_ids=ids, use_cache=False).past_key_values is None
        out = model(input_ids=ids, use_cache=False, return_dict=False)
        assert out[0].shape[:2] == (2, 5) and not any(hasattr(o, "get_seq_length") for o in out)

    # a returned cache continues the sequence: model(b, past of a) == model(a + b) on b's positions
    a, b = ids, input_ids(2, 3, seed=2)
    with torch.no_grad():
        full = model(input_ids=torch.cat([a, b], 1)).logits[:, a.shape[1]:]
        past = model(input_ids=a, use_cache=True).past_key_values
        torch.testing.assert_close(model(input_ids=b, past_key_values=past).logits, full, rtol=1e-5, atol=1e-5)
        past = model(input_ids=a, use_cache=True, attention_mask=torch.ones_like(a)).past_key_values
        mask = torch.ones(2, a.shape[1] + b.shape[1], dtype=torch.long)
        torch.testing.assert_close(model(input_ids=b, past_key_values=past, attention_mask=mask).logits, full,
                                   rtol=1e-5, atol=1e-5)

    # greedy generate with the cache == cache-free greedy loop
    ids1 = input_ids(1, 5, seed=3)
    gen = model.generate(ids1, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, greedy_no_cache(model, ids1, 6))


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_left_padded_batch(arch):
    model = prefixed(arch)
    a, b = input_ids(1, 6, seed=11)[0], input_ids(1, 3, seed=12)[0]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    row0 = greedy_no_cache(model, a[None], 5)
    row1 = greedy_no_cache(model, b[None], 5)
    assert torch.equal(gen[0], row0[0])
    assert torch.equal(gen[1, 3:], row1[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_beam_search(arch):
    model = prefixed(arch)
    ids = input_ids(2, 4, seed=7)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    with_cache = model.generate(ids, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (4, 8)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_prefix_projection(arch):
    model = prefixed(arch, prefix_projection=True, encoder_hidden_size=16)
    enc = model.fastadapters_prefix["default"]
    assert enc.transform is not None
    ids = input_ids(2, 5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    ids1 = input_ids(1, 4, seed=9)
    gen = model.generate(ids1, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen, greedy_no_cache(model, ids1, 5))


def test_prefix_unpatch_restores_model():
    model = tiny_model("llama")
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cls_forward = type(model).forward
    fa.patch(model, adapter="prefix", num_virtual_tokens=P)
    assert "forward" in model.__dict__
    fa.unpatch(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is cls_forward
    assert_state_identical(before, snapshot(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    # and the model works as before
    ids = input_ids(1, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_prefix_beside_lora_switches():
    ids = input_ids(2, 5)
    only_prefix = prefixed("llama")
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", r=2, name="lo")
    fa.patch(model, adapter="prefix", num_virtual_tokens=P, name="pre")
    with torch.no_grad():
        model.fastadapters_prefix["pre"].embedding.weight.copy_(only_prefix.fastadapters_prefix["default"].embedding.weight)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
        lo = model(input_ids=ids).logits
        fa.set_adapter(model, "pre")
        torch.testing.assert_close(model(input_ids=ids).logits, only_prefix(input_ids=ids).logits, rtol=0, atol=0)
        fa.set_adapter(model, None)
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits, rtol=0, atol=0)
        fa.set_adapter(model, "lo")
        torch.testing.assert_close(model(input_ids=ids).logits, lo, rtol=0, atol=0)
    fa.set_adapter(model, "pre")
    ids1 = input_ids(1, 4, seed=9)
    assert torch.equal(model.generate(ids1, max_new_tokens=4, do_sample=False), greedy_no_cache(only_prefix, ids1, 4))
    fa.delete_adapter(model, "pre")  # the last prefix: the instance forward goes away
    assert "forward" not in model.__dict__ and fa.adapter_names(model) == ["lo"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, lo, rtol=0, atol=0)


def test_prefix_with_gradient_checkpointing_says_why():
    """transformers' checkpointed layers drop past_key_values, so training a prefix under gradient
    checkpointing cannot work; it must fail with an error that says so (not a shape mismatch)."""
    model = prefixed("llama")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    ids = input_ids(2, 5)
    model.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    model.eval()  # checkpointing only acts in training: inference and generate still work
    ids1 = input_ids(1, 4, seed=9)
    assert torch.equal(model.generate(ids1, max_new_tokens=3, do_sample=False), greedy_no_cache(model, ids1, 3))
