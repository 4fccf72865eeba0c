"""The public names of ``fastadapters`` stay the functions and classes they document, whatever was
imported before: Python binds an imported submodule as an attribute of its package, so a submodule
named like a public function (``fastadapters/merge.py`` and ``fa.merge``) would replace the function
with the module as soon as anything imported it."""
from __future__ import annotations

import importlib
import pkgutil
import types

import fastadapters as fa


def test_public_names_are_not_shadowed_by_submodules():
    for info in pkgutil.iter_modules(fa.__path__):
        importlib.import_module(f"fastadapters.{info.name}")
    for name in fa.__all__:
        value = getattr(fa, name)
        assert not isinstance(value, types.ModuleType), f"fa.{name} is the module {value.__name__}, not the API"
        assert callable(value), name


def test_merge_after_merge_and_unload_is_the_function():
    from tiny_models import tiny_model

    fa.merge_and_unload  # the order a user hit: this imported the defining module first
    model = fa.patch(tiny_model("llama"), adapter="lora", r=2)
    fa.merge(model, "default")
    assert fa.adapter_names(model) == []
