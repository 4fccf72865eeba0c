"""Review: PEFT LoRA files that use a LoRA variant with other forward semantics are refused.

PEFT 0.17+ writes fields such as ``alora_invocation_tokens`` (Activated LoRA: the adapter acts only
on tokens from the invocation sequence on), ``arrow_config`` (routing among LoRA experts),
``use_bdlora``, ``kasa_config``, ``monteclora_config`` and ``use_qalora``. Their weights can have
plain LoRA shapes, so loading such a file as plain LoRA would silently compute something else; like
``use_dora`` it must be an error that names the field, and the model must stay as it was.
"""
from __future__ import annotations

import json

import pytest

import fastadapters as fa
from fastadapters import patching
from tiny_models import assert_state_identical, snapshot, tiny_model


@pytest.fixture
def peft_lora_dir(tmp_path):
    src = tiny_model("llama")
    fa.patch(src, adapter="lora", r=2)
    fa.save_adapter(src, tmp_path, format="peft")
    return tmp_path


@pytest.mark.parametrize("field,value", [
    ("alora_invocation_tokens", [5, 6, 7]),
    ("arrow_config", {"top_k": 2}),
    ("use_bdlora", {"nblocks": 2}),
    ("kasa_config", {"beta": 0.1}),
    ("monteclora_config", {"n_samples": 4}),
    ("use_qalora", True),
])
def test_peft_lora_variants_are_refused(peft_lora_dir, field, value):
    cfg_file = peft_lora_dir / "adapter_config.json"
    d = json.loads(cfg_file.read_text())
    d[field] = value
    cfg_file.write_text(json.dumps(d))
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{field}=.* is not supported"):
        fa.load_adapter(model, peft_lora_dir)
    assert patching._state(model) is None
    assert_state_identical(before, snapshot(model))


def test_peft_defaults_of_those_fields_still_load(peft_lora_dir):
    cfg_file = peft_lora_dir / "adapter_config.json"
    d = json.loads(cfg_file.read_text())
    d.update(alora_invocation_tokens=None, arrow_config=None, use_bdlora=None, kasa_config=None,
             monteclora_config=None, use_qalora=False)
    cfg_file.write_text(json.dumps(d))
    model = fa.load_adapter(tiny_model("llama"), peft_lora_dir)
    assert fa.adapter_names(model) == ["default"]
