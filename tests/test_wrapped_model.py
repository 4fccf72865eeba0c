"""A wrapper around a patched model (DataParallel / DistributedDataParallel's ``module``, torch.compile's
``_orig_mod``) holds no adapters itself: passing it to the API used to say "call patch first" (to a
user who had) or list no adapters; now the error names the attribute that holds the patched model,
and nothing is written."""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from tiny_models import tiny_model


def _wrappers(model):
    yield "module", torch.nn.DataParallel(model)  # DDP's layout (``module``) without a process group
    yield "_orig_mod", torch.compile(model)  # only wraps; nothing compiles until it runs


@pytest.mark.parametrize("which", [0, 1])
def test_api_on_a_wrapper_names_the_patched_model_inside(which, tmp_path):
    model = fa.patch(tiny_model("llama"), adapter="lora", r=2)
    attr, wrapper = list(_wrappers(model))[which]
    for call in (lambda: fa.save_adapter(wrapper, tmp_path / "a"), lambda: fa.adapter_names(wrapper),
                 lambda: fa.get_config(wrapper), lambda: fa.merge_and_unload(wrapper)):
        with pytest.raises(ValueError, match=rf"around a patched model: pass the model inside it, model\.{attr}"):
            call()
    assert not (tmp_path / "a").exists()
    assert fa.adapter_names(model) == ["default"]  # nothing changed on the model inside
    fa.save_adapter(getattr(wrapper, attr), tmp_path / "b")
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()


def test_unpatched_model_and_its_wrapper_keep_their_answers():
    model = tiny_model("llama")
    assert fa.adapter_names(model) == [] and fa.adapter_names(torch.nn.DataParallel(model)) == []
    with pytest.raises(ValueError, match="call fastadapters.patch"):
        fa.get_config(torch.nn.DataParallel(model))
