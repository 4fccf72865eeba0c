"""Prefix-tuning through the KV cache on every supported architecture.

The prefix enters as P past positions of each layer's cache. Checks:
- exactness: a prefix set to the base model's own cache of P real tokens makes the prefixed model
  give the base model's logits on (those P tokens + the input), the independent meaning of
  "P past positions";
- training: the loss backpropagates into the prefix and nowhere into the frozen base;
- generation: greedy ``generate`` with the cache equals a cache-free greedy loop, also for a
  left-padded batch (each row must equal its prompt generated alone), and beam search with the
  cache equals beam search without it; ``prefix_projection=True`` works the same way;
- gradient checkpointing: loss and prefix gradients equal those without it (reentrant or not).
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


def _enable_checkpointing(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x; gradient_checkpointing_enable is its deprecated alias
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _prefix_loss_and_grads(arch, checkpointing, reentrant=False, **kw):
    model = prefixed(arch, **kw)
    for m in model.modules():  # dropout off, train mode on (checkpointing acts only in training)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if checkpointing:
        _enable_checkpointing(model, reentrant)
    model.train()
    leaf_calls = []  # calls of the weight-holding leaf modules (Linear, GPT-2's Conv1D, norms, ...)
    for m in model.modules():
        if not list(m.children()) and list(m.parameters(recurse=False)):
            m.register_forward_hook(lambda *_: leaf_calls.append(1))
    ids = input_ids(2, 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    flags = [(m.__dict__.get("gradient_checkpointing"), m.__dict__.get("_can_checkpoint_with_cache"))
             for m in model.modules()]
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert flags == [(m.__dict__.get("gradient_checkpointing"), m.__dict__.get("_can_checkpoint_with_cache"))
                     for m in model.modules()], "instance flags not restored after the call"
    assert sum(f is True for f, _ in flags) >= (LAYERS if checkpointing else 0)
    forward_calls = len(leaf_calls)
    out.loss.backward()
    recomputed = len(leaf_calls) - forward_calls  # > 0 only if layers ran again in backward
    enc = model.fastadapters_prefix["default"]
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(p.grad is None for n, p in model.named_parameters() if "fastadapters_prefix" not in n)
    return model, out, grads, recomputed


@pytest.mark.parametrize("reentrant,projection", [(False, False), (True, True)],
                         ids=["non_reentrant", "reentrant_projection"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_gradient_checkpointing_equals_plain(arch, reentrant, projection):
    """Under gradient checkpointing (train mode, dropout off, fp32) the loss and the prefix gradients
    equal those without it, the layers really are recomputed in backward, and the per-call instance
    flags are gone afterwards. transformers' checkpointed layers drop past_key_values unless
    ``_can_checkpoint_with_cache``; the prefix rides a read-only cache that the replay sees unchanged."""
    kw = dict(prefix_projection=True, encoder_hidden_size=16) if projection else {}
    _, ref, ref_grads, recomputed = _prefix_loss_and_grads(arch, False, **kw)
    assert recomputed == 0
    model, out, grads, recomputed = _prefix_loss_and_grads(arch, True, reentrant, **kw)
    assert recomputed > 0, "no layer was recomputed: checkpointing did not act"
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        assert g is not None and ref_grads[n].abs().sum() > 0, n
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7)
    assert out.past_key_values is None  # the read-only training cache is not handed back


def test_prefix_gradient_checkpointing_then_generate():
    """Checkpointing acts only in training: after a checkpointed step, eval, generate and a second
    training step still work as without it."""
    model = prefixed("llama")
    _enable_checkpointing(model, False)
    ids = input_ids(2, 5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    ids1 = input_ids(1, 4, seed=9)
    assert torch.equal(model.generate(ids1, max_new_tokens=3, do_sample=False), greedy_no_cache(model, ids1, 3))
    a, b = ids, input_ids(2, 3, seed=2)  # a started cache continues the sequence under checkpointing too
    with torch.no_grad():
        past = model(input_ids=a, use_cache=True).past_key_values
        full = model(input_ids=torch.cat([a, b], 1)).logits[:, a.shape[1]:]
        model.train()
        torch.testing.assert_close(model(input_ids=b, past_key_values=past).logits, full, rtol=1e-5, atol=1e-5)
    assert past.get_seq_length() == P + a.shape[1]  # read, not extended
    g = model.fastadapters_prefix["default"].embedding.weight.grad.clone()
    model(input_ids=ids, labels=ids).loss.backward()  # the same step again: the gradient doubles
    torch.testing.assert_close(model.fastadapters_prefix["default"].embedding.weight.grad, 2 * g)


def test_prefix_refuses_a_static_cache_with_a_reason():
    """A fixed-size (compileable) cache has no room for the prefix: a clear error, not a mask-shape one."""
    from transformers import StaticCache

    model = fa.patch(tiny_model("llama"), adapter="prefix", num_virtual_tokens=3)
    ids = input_ids()
    with pytest.raises(ValueError, match=r"prefix-tuning cannot use a StaticCache .*use the default dynamic cache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static", pad_token_id=0)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="cannot use a StaticCache"):
        model(ids, past_key_values=cache)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the default still works
    assert out.shape == (ids.shape[0], ids.shape[1] + 3)
