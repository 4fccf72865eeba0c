"""Target-module matching (every given name must match; "all-linear"; comma-separated strings) and
one adapter vocabulary: every ``--adapter`` spelling of the command line patches through the API."""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from fastadapters.layers import AdapterLinear
from tiny_models import input_ids, snapshot, assert_state_identical, tiny_model


def _adapted(model, name="default"):
    return sorted(model._fastadapters.kinds[name])


# ----------------------------------------------------------------------------- target modules
@pytest.mark.parametrize("targets, typo", [
    (["q_prj", "v_proj"], "q_prj"),
    (["q_proj", "v_prj"], "v_prj"),
    ("q_proj,v_prj", "v_prj"),
])
def test_a_name_that_matches_nothing_is_an_error_listing_the_models_names(targets, typo):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        fa.patch(model, adapter="lora", target_modules=targets)
    msg = str(e.value)
    assert repr(typo) in msg and "matched no module" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert repr(name) in msg  # the names the model has
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())  # nothing changed
    assert "_fastadapters" not in model.__dict__
    assert_state_identical(snapshot(model), before)


def test_a_typo_on_a_second_adapter_leaves_the_first_as_it_was():
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"\['vv_proj'\] matched no module"):
        fa.patch(model, adapter="parallel", target_modules=["k_proj", "vv_proj"], name="p")
    assert fa.adapter_names(model) == ["default"]
    assert not any(isinstance(m, AdapterLinear) and "p" in m.specs for m in model.modules())


@pytest.mark.parametrize("spelling", ["q_proj,v_proj", " q_proj , v_proj ", ["q_proj", "v_proj"]])
def test_comma_separated_string_equals_the_list(spelling):
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", target_modules=spelling)
    assert _adapted(model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert fa.get_config(model).target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom"])
def test_all_linear_is_every_linear_but_the_output_head(arch):
    from transformers.pytorch_utils import Conv1D

    model = tiny_model(arch)
    head = model.get_output_embeddings()
    expected = sorted(p for p, m in model.named_modules()
                      if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head)
    assert expected  # the tiny model has linears besides the head
    fa.patch(model, adapter="lora", target_modules="all-linear")
    assert _adapted(model) == expected
    assert not isinstance(model.get_output_embeddings(), AdapterLinear)
    # the saved config lists what "all-linear" stood for, and a fresh model patched with it matches
    names = fa.get_config(model).target_modules
    assert "all-linear" not in names
    other = fa.patch(tiny_model(arch), config=fa.get_config(model))
    assert _adapted(other) == expected


def test_all_linear_cannot_be_mixed_with_names():
    with pytest.raises(ValueError, match=r'"all-linear" on its own'):
        fa.patch(tiny_model("llama"), adapter="lora", target_modules=["all-linear", "q_proj"])


def test_prefix_takes_no_target_modules_even_all_linear():
    with pytest.raises(ValueError, match=r"PrefixConfig\.target_modules"):
        fa.patch(tiny_model("llama"), adapter="prefix", target_modules="all-linear")


# ----------------------------------------------------------------------------- one vocabulary
def _cli_adapter_choices() -> list[str]:
    from fastadapters.train import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if "--adapter" in a.option_strings)
    return list(action.choices)


def test_cli_spellings_are_read_from_the_parser():
    # the test below enumerates these; a parser without the named placements would hide a gap
    assert {"lora", "series", "pfeiffer", "parallel", "prefix"} <= set(_cli_adapter_choices())


@pytest.mark.parametrize("spelling", _cli_adapter_choices() + ["houlsby"])
def test_every_cli_adapter_spelling_patches_through_the_api(spelling):
    from argparse import Namespace

    from fastadapters.train import adapter_config, build_parser

    model = tiny_model("llama")
    ref = model(input_ids=input_ids()).logits
    fa.patch(model, adapter=spelling)
    cfg = fa.get_config(model)
    if spelling in _cli_adapter_choices():  # the API builds the config the CLI builds for --adapter <spelling>
        args: Namespace = build_parser().parse_args(["--base-model", "x", "--data", "y", "--output-dir", "z",
                                                     "--adapter", spelling])
        assert cfg == adapter_config(args)
    kinds = set(model._fastadapters.kinds["default"].values())
    expected_kinds = {"lora": {"lora"}, "series": {"mh", "output"}, "houlsby": {"mh", "output"},
                      "pfeiffer": {"output"}, "parallel": {"parallel"}, "prefix": set()}[spelling]
    assert kinds == expected_kinds
    if spelling in ("series", "houlsby", "pfeiffer"):
        assert cfg.variant == ("pfeiffer" if spelling == "pfeiffer" else "houlsby")
    out = model(input_ids=input_ids()).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_a_spelling_and_a_variant_that_disagree_are_an_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"adapter='pfeiffer' means variant='pfeiffer'; got variant='houlsby'"):
        fa.patch(model, adapter="pfeiffer", variant="houlsby")
    assert "_fastadapters" not in model.__dict__
    fa.patch(model, adapter="pfeiffer", variant="pfeiffer")  # agreeing is fine
    assert fa.get_config(model).variant == "pfeiffer"
