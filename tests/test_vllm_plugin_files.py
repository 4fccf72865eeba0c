"""The vLLM plugin's pieces that run without vLLM (fastadapters/vllm_plugin): reading our adapter files
as vLLM LoRA tensors, the refusals, the per-token activations, the version gate, and that
``import fastadapters`` does not import the plugin. The served behaviour is tested in tests/vllm_tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import fastadapters as fa
from fastadapters.config import ACTIVATIONS
from fastadapters.ops.bottleneck import ACT_FNS
from fastadapters.vllm_plugin import TESTED_VLLM, _vllm_internals
from fastadapters.vllm_plugin.files import ACTIVATIONS as PLUGIN_ACTIVATIONS
from fastadapters.vllm_plugin.files import AdapterRefused, placements, read_fastadapters


def _randomize(model, name):
    from fastadapters.patching import _wrappers

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, w in _wrappers(model):
            for c in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
                if name in c:
                    c[name].weight.copy_(torch.randn(c[name].weight.shape, generator=g))
            if name in w.adapter_scaling:
                w.adapter_scaling[name].fill_(0.37)


@pytest.mark.parametrize("scaling", [2.5, "learned"])
def test_parallel_adapter_becomes_lora_tensors_with_scaling_folded(make_tiny, tmp_path, scaling):
    model = make_tiny("llama")
    fa.patch(model, "parallel", name="p", bottleneck_size=5, non_linearity="gelu", scaling=scaling)
    _randomize(model, "p")
    fa.save_adapter(model, tmp_path / "p", name="p")
    peft, tensors, act = read_fastadapters(str(tmp_path / "p"))
    assert act == "gelu" and peft["r"] == 5 and peft["lora_alpha"] == 5  # vLLM's own scaling: 1
    assert peft["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    from fastadapters.patching import _wrappers

    seen = 0
    for path, w in _wrappers(model):
        if "p" not in w.adapter_down:
            continue
        s = float(w.adapter_scaling["p"].detach()) if scaling == "learned" else 2.5
        a = tensors[f"base_model.model.{path}.lora_A.weight"]
        b = tensors[f"base_model.model.{path}.lora_B.weight"]
        torch.testing.assert_close(a, w.adapter_down["p"].weight.detach(), rtol=0, atol=0)
        ref = (w.adapter_up["p"].weight.detach().double() * s).float()
        torch.testing.assert_close(b, ref, rtol=0, atol=0)
        # the served branch, B·act(A·x), equals our parallel adapter's s·U·act(D·x)
        x = torch.randn(7, a.shape[1], dtype=torch.float64)
        want = s * ACT_FNS["gelu"](x @ w.adapter_down["p"].weight.double().t()) @ w.adapter_up["p"].weight.double().t()
        got = ACT_FNS["gelu"](x @ a.double().t()) @ b.double().t()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        seen += 1
    assert seen == 6  # q, k, v on each of 2 layers
    assert len(tensors) == 2 * seen


def test_lora_in_our_format_keeps_its_alpha_and_names(make_tiny, tmp_path):
    model = make_tiny("llama")
    fa.patch(model, "lora", name="l", r=4, alpha=12, target_modules=["q_proj", "down_proj"])
    fa.save_adapter(model, tmp_path / "l", name="l")
    peft, tensors, act = read_fastadapters(str(tmp_path / "l"))
    assert act == "identity" and peft["r"] == 4 and peft["lora_alpha"] == 12
    assert peft["target_modules"] == ["down_proj", "q_proj"]
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert any(k.endswith("down_proj.lora_B.weight") for k in tensors)


def test_peft_files_are_left_to_vllm(make_tiny, tmp_path):
    model = make_tiny("llama")
    fa.patch(model, "lora", name="l", r=4)
    fa.save_adapter(model, tmp_path / "l", name="l", format="peft")
    assert read_fastadapters(str(tmp_path / "l")) is None


def test_prefix_is_refused_with_the_reason(make_tiny, tmp_path):
    model = make_tiny("llama")
    fa.patch(model, "prefix", name="a", num_virtual_tokens=2)
    fa.save_adapter(model, tmp_path / "a", name="a")
    before = sorted(os.listdir(tmp_path / "a"))
    with pytest.raises(AdapterRefused, match="prefix") as e:
        read_fastadapters(str(tmp_path / "a"))
    assert "fastadapters serve" in str(e.value)
    assert sorted(os.listdir(tmp_path / "a")) == before


@pytest.mark.parametrize("variant,want", [("pfeiffer", {"down_proj": "output"}),
                                          ("houlsby", {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"})])
def test_series_adapters_carry_their_placements(make_tiny, tmp_path, variant, want):
    model = make_tiny("llama")
    fa.patch(model, "series", name="s", variant=variant, bottleneck_size=3, non_linearity="relu", scaling=0.5)
    _randomize(model, "s")
    fa.save_adapter(model, tmp_path / "s", name="s")
    peft, tensors, act = read_fastadapters(str(tmp_path / "s"))
    assert act == "relu" and peft["r"] == 3
    got = placements(str(tmp_path / "s"))
    assert {k.rsplit(".", 1)[-1]: v for k, v in got.items()} == want
    assert len(got) == 2 * len(want)  # both layers of the tiny llama
    for path in got:
        up = model.get_submodule(path).adapter_up["s"].weight.detach()
        torch.testing.assert_close(tensors[f"base_model.model.{path}.lora_B.weight"], up * 0.5, rtol=0, atol=0)


def test_every_activation_we_train_is_one_the_plugin_serves():
    assert set(ACTIVATIONS) <= set(PLUGIN_ACTIVATIONS)
    assert set(_vllm_internals.ACT_CODES) == set(PLUGIN_ACTIVATIONS) - {"swish"}


def test_per_token_activations_match_ours():
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(37, 5, generator=g) * 3
    names = ["identity", "tanh", "relu", "gelu", "silu", "sigmoid"]
    codes = torch.tensor([i % len(names) for i in range(37)], dtype=torch.int32)
    out = _vllm_internals._acts(buf, codes)
    for i in range(37):
        name = names[int(codes[i])]
        want = buf[i] if name == "identity" else ACT_FNS[name](buf[i].double()).float()
        torch.testing.assert_close(out[i], want, rtol=1e-6, atol=1e-6)


def test_an_untested_vllm_release_refuses_naming_its_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.99.1"))
    with pytest.raises(RuntimeError, match=r"vLLM 0\.99\.1") as e:
        _vllm_internals._check_version()
    assert TESTED_VLLM[0] in str(e.value)


def test_import_fastadapters_does_not_import_the_plugin():
    code = "import sys, fastadapters; print(any(m.startswith('fastadapters.vllm_plugin') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_entry_point_is_declared():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["entry-points"]["vllm.general_plugins"]["fastadapters"] == \
        "fastadapters.vllm_plugin:register"
    assert "fastadapters.vllm_plugin" in meta["tool"]["setuptools"]["packages"]
