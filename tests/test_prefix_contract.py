"""Prefix-tuning's contract with transformers, across the releases we support (5.17 .. 5.24).

The prefix reaches the model as the leading positions of its KV cache, handed in under the name the
release's forward takes (``past_key_values`` up to 5.23, ``cache`` from 5.24). Pinned here:
- either spelling from a caller works, and our own calls raise no deprecation warning;
- a forward that ignores the cache we pass (the way 5.24 silently dropped the prefix before this
  was fixed) raises an error naming the transformers version instead of returning wrong tokens;
- a forward that takes no cache at all is refused at ``patch`` time, leaving the model as it was.
The generation contract itself (greedy ``generate`` of a left-padded batch equals each row decoded
alone by full forwards without a cache, prefix included) is ``test_prefix.py::test_prefix_left_padded_batch``
on all 8 families.
"""
from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
import transformers

import fastadapters as fa
from fastadapters.patching import PREFIX_CACHE_ARGUMENTS
from tiny_models import assert_state_identical, input_ids, snapshot, tiny_model


def _prefixed(arch="llama"):
    model = fa.patch(tiny_model(arch), adapter="prefix", num_virtual_tokens=3)
    with torch.no_grad():
        for p in model.fastadapters_prefix["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return model


def _cache_name(model) -> str:
    params = inspect.signature(type(model).forward).parameters
    return next(n for n in PREFIX_CACHE_ARGUMENTS if n in params)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_our_calls_use_no_deprecated_cache_name(arch, caplog):
    model = _prefixed(arch)
    ids = input_ids(2, 5, seed=1)
    logging.Logger.warning_once.cache_clear()  # transformers logs its deprecation once per process
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with torch.no_grad():
            model(input_ids=ids)
        model.generate(ids, max_new_tokens=3, do_sample=False)
    said = [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "deprecated" in s and ("past_key_values" in s or "cache" in s)], said


def test_either_cache_spelling_continues_the_sequence():
    model = _prefixed()
    a, b = input_ids(2, 4, seed=2), input_ids(2, 3, seed=4)
    name = _cache_name(model)
    with torch.no_grad():
        full = model(input_ids=torch.cat([a, b], 1)).logits[:, a.shape[1]:]
        for spelling in PREFIX_CACHE_ARGUMENTS:
            past = model(input_ids=a, use_cache=True)[name]
            got = model(input_ids=b, **{spelling: past}).logits
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_both_cache_spellings_at_once_is_an_error():
    model = _prefixed()
    a = input_ids(1, 4, seed=2)
    with torch.no_grad():
        past = model(input_ids=a, use_cache=True)[_cache_name(model)]
        with pytest.raises(TypeError, match="pass the cache once"):
            model(input_ids=a, cache=past, past_key_values=past)


def test_a_forward_that_drops_the_cache_fails_loudly(monkeypatch):
    """If a release stops reading the cache we pass, the result would ignore the prefix: refuse it."""
    model = _prefixed()
    name = _cache_name(model)
    inner = model.model.forward

    def drops_cache(*args, **kwargs):  # what 5.24 did to a prefix passed under the old name
        kwargs[name] = None
        return inner(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", drops_cache)
    ids = input_ids(1, 4, seed=5)
    with pytest.raises(RuntimeError, match=rf"transformers {transformers.__version__} did not use the cache"):
        with torch.no_grad():
            model(input_ids=ids)
    with pytest.raises(RuntimeError, match="prefix was ignored"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


def test_a_forward_without_a_cache_argument_is_refused_at_patch():
    model = tiny_model("llama")
    plain = type(model).forward

    def forward(self, input_ids=None, attention_mask=None, labels=None):  # no cache parameter at all
        return plain(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    model.forward = forward.__get__(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=rf"under transformers {transformers.__version__} takes its KV cache "
                                           r"under none of \('cache', 'past_key_values'\)"):
        fa.patch(model, adapter="prefix", num_virtual_tokens=2)
    assert "_fastadapters" not in model.__dict__ and not hasattr(model, "fastadapters_prefix")
    assert_state_identical(before, snapshot(model))
