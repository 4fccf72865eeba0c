"""What the documentation promises: the README points to design notes that ship with the repository,
the bottleneck ``init`` choice behaves as documented (``bert`` changes outputs before training,
``zero_up`` does not), and every family in ``models.py`` has default targets for every adapter type."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastadapters as fa
from fastadapters import models
from tiny_models import ARCHS, input_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_readme_points_to_the_design_notes_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert "docs/DESIGN.md" in links
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    assert "shared folder" not in readme  # users do not have the project's shared folder


@pytest.mark.parametrize("doc", ["README.md", "docs/DESIGN.md"])
def test_the_docs_say_bottleneck_init_changes_outputs_and_name_zero_up(doc):
    text = " ".join((ROOT / doc).read_text().split())
    assert re.search(r"change[s]? the (model's )?outputs before (any )?training", text)
    assert "zero_up" in text


@pytest.mark.parametrize("adapter", ["series", "parallel"])
def test_bert_init_changes_outputs_before_training_and_zero_up_does_not(adapter):
    ids = input_ids()
    base = tiny_model("llama")
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        bert = fa.patch(tiny_model("llama"), adapter=adapter)(input_ids=ids).logits
        zero = fa.patch(tiny_model("llama"), adapter=adapter, init="zero_up")(input_ids=ids).logits
    assert fa.SeriesConfig().init == "bert"  # the documented default
    assert (bert - ref).abs().max() > 1e-4
    torch.testing.assert_close(zero, ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_has_default_targets_for_every_adapter_type(arch):
    model = tiny_model(arch)
    assert models.architecture_of(model) is not None, f"{arch} has no row in models.ARCHITECTURES"
    for spelling in ("lora", "houlsby", "pfeiffer", "parallel"):
        m = fa.patch(tiny_model(arch), adapter=spelling)
        paths = set(m._fastadapters.kinds["default"])
        assert paths, (arch, spelling)
        with torch.no_grad():
            assert torch.isfinite(m(input_ids=input_ids()).logits).all()
