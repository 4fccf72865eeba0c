"""Review: ``load_adapter`` keeps the patch state as it was on error, and does not ignore ``backend``.

* A load that fails after patching is rolled back with ``delete_adapter``; when the model carried
  other adapters with none active (``set_adapter(model, None)``), the rollback must not leave one of
  them active and trainable.
* Re-loading weights into an adapter the model already has must validate ``backend`` (a bad name
  is an error, as everywhere else) and apply it, as ``patch`` does for a later adapter.
"""
from __future__ import annotations

import pytest

import fastadapters as fa
from fastadapters import io as faio
from fastadapters import patching
from tiny_models import tiny_model


@pytest.fixture
def saved_lora(tmp_path):
    src = tiny_model("llama")
    fa.patch(src, adapter="lora", r=2)
    fa.save_adapter(src, tmp_path)
    return tmp_path


def _grad_flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_rolled_back_load_keeps_no_adapter_active(saved_lora, monkeypatch):
    model = tiny_model("llama")
    fa.patch(model, adapter="series", variant="pfeiffer", bottleneck_size=4, name="keep")
    fa.set_adapter(model, None)  # run the bare base model
    flags = _grad_flags(model)

    def boom(*a, **k):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(faio, "_adapter_entries", boom)
    with pytest.raises(RuntimeError, match="copy failed"):
        fa.load_adapter(model, saved_lora, name="new")
    st = patching._state(model)
    assert fa.adapter_names(model) == ["keep"]
    assert st.active is None
    assert all(w.active_adapter is None for _, w in patching._wrappers(model))
    assert _grad_flags(model) == flags


def test_rolled_back_load_keeps_the_backend(saved_lora, monkeypatch):
    model = tiny_model("llama")
    fa.patch(model, adapter="series", variant="pfeiffer", bottleneck_size=4, name="keep", backend="torch")
    monkeypatch.setattr(faio, "_adapter_entries", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("copy failed")))
    with pytest.raises(RuntimeError, match="copy failed"):
        fa.load_adapter(model, saved_lora, name="new", backend="auto")
    assert patching._state(model).backend == "torch"
    assert all(w.backend == "torch" for _, w in patching._wrappers(model))


def test_reload_into_existing_adapter_validates_and_applies_backend(saved_lora):
    model = tiny_model("llama")
    fa.load_adapter(model, saved_lora)
    with pytest.raises(ValueError, match=r"backend: got 'gpu'; valid"):
        fa.load_adapter(model, saved_lora, backend="gpu")
    assert patching._state(model).backend is None
    fa.load_adapter(model, saved_lora, backend="torch")
    assert patching._state(model).backend == "torch"
    assert all(w.backend == "torch" for _, w in patching._wrappers(model))
