"""``merge`` / ``merge_and_unload`` fold LoRA into the base weights exactly (fp64 reference, dtype
kept, Conv1D's transposed storage); bottleneck and prefix adapters are refused and change nothing;
``save_pretrained`` of a patched model refuses and writes nothing, and after ``merge_and_unload`` or
``unpatch`` the saved folder reloads in plain transformers with the expected outputs."""
from __future__ import annotations

import os

import pytest
import torch

import fastadapters as fa
from fastadapters.layers import AdapterLinear, base_weight_nk
from tiny_models import assert_state_identical, input_ids, snapshot, tiny_model


def _lora(model, name="default", seed=1, **fields):
    """Patch a LoRA adapter with nonzero B (a fresh LoRA is the identity) and return its layers."""
    fa.patch(model, adapter="lora", name=name, **{"r": 5, "alpha": 7, **fields})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdapterLinear) and name in m.lora_B:
                m.lora_B[name].weight.copy_(torch.randn(m.lora_B[name].weight.shape, generator=g) * 0.3)
    return model


def _expected_weights(model, name):
    """{path: W + s·B·A in fp64, as (out, in)} for every layer of adapter ``name``."""
    out = {}
    for path in model._fastadapters.kinds[name]:
        w = model.get_submodule(path)
        A, B = w.lora_A[name].weight.double(), w.lora_B[name].weight.double()
        out[path] = base_weight_nk(w.base_layer).double() + w.specs[name].scaling * (B @ A)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # gpt2: Conv1D (fan_in_fan_out)
def test_merge_and_unload_leaves_a_plain_model_with_the_patched_logits(arch):
    model = tiny_model(arch)
    keys = list(model.state_dict())
    _lora(model, target_modules="all-linear")
    ids = input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    expected = _expected_weights(model, "default")
    assert fa.merge_and_unload(model) is model
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert "_fastadapters" not in model.__dict__ and "save_pretrained" not in model.__dict__
    assert list(model.state_dict()) == keys
    for path, w64 in expected.items():  # the fold itself, against fp64: within fp32 rounding
        got = base_weight_nk(model.get_submodule(path)).double()
        assert (got - w64).abs().max() <= 2 * torch.finfo(torch.float32).eps * w64.abs().max(), path
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_merge_keeps_the_base_dtype_and_rounds_once():
    model = tiny_model("llama").to(torch.bfloat16)
    _lora(model, use_rslora=True)
    expected = _expected_weights(model, "default")
    fa.merge_and_unload(model)
    for path, w64 in expected.items():
        got = model.get_submodule(path).weight
        assert got.dtype == torch.bfloat16
        # one rounding of the exact sum: at most half a bf16 step from it (plus the fp32 sum's error)
        step = torch.finfo(torch.bfloat16).eps * w64.abs().clamp_min(2.0 ** -126)
        assert ((got.double() - w64).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).all(), path


def test_merge_one_of_two_adapters_keeps_the_other():
    model = tiny_model("llama")
    _lora(model, name="a", target_modules=["q_proj", "v_proj"], seed=1)
    _lora(model, name="b", target_modules=["k_proj", "v_proj"], seed=2)
    fa.patch(model, adapter="parallel", name="p", target_modules=["k_proj"])
    ids = input_ids()
    fa.set_adapter(model, "a")
    with torch.no_grad():
        with_a = model(input_ids=ids).logits
    b_layers = {p: (model.get_submodule(p).lora_A["b"].weight.clone(), model.get_submodule(p).lora_B["b"].weight.clone())
                for p in model._fastadapters.kinds["b"]}
    fa.merge(model, "a")
    assert fa.adapter_names(model) == ["b", "p"]
    assert not any(isinstance(m, AdapterLinear) and "a" in m.specs for m in model.modules())
    assert not isinstance(model.model.layers[0].self_attn.q_proj, AdapterLinear)  # no adapter left there
    for p, (A, B) in b_layers.items():
        assert torch.equal(model.get_submodule(p).lora_A["b"].weight, A)
        assert torch.equal(model.get_submodule(p).lora_B["b"].weight, B)
    fa.set_adapter(model, None)  # the bare model now carries "a"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, with_a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling, what", [
    (dict(adapter="series"), r"'default' is a series adapter \(houlsby placement\).*tanh.*only LoRA"),
    (dict(adapter="pfeiffer", non_linearity="relu"), r"series adapter \(pfeiffer placement\).*relu"),
    (dict(adapter="parallel"), r"'default' is a parallel adapter"),
    (dict(adapter="prefix", num_virtual_tokens=3), r"'default' is a prefix adapter.*cannot be merged"),
])
@pytest.mark.parametrize("call", ["merge", "merge_and_unload"])
def test_adapters_that_do_not_fold_are_refused_and_nothing_changes(spelling, what, call):
    model = fa.patch(tiny_model("llama"), **spelling)
    before = snapshot(model)
    with pytest.raises(ValueError, match=what):
        getattr(fa, call)(model)
    assert fa.adapter_names(model) == ["default"]
    assert_state_identical(snapshot(model), before)


def test_merge_and_unload_refuses_to_drop_other_adapters():
    model = _lora(tiny_model("llama"))
    fa.patch(model, adapter="series", name="s")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"also holds 's' \(series\).*fastadapters\.delete_adapter"):
        fa.merge_and_unload(model)
    assert fa.adapter_names(model) == ["default", "s"]
    assert_state_identical(snapshot(model), before)
    fa.delete_adapter(model, "s")
    fa.merge_and_unload(model)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())


def test_merge_refuses_tied_weights_and_names_the_other_holder():
    model = tiny_model("gpt2")  # lm_head shares its weight with the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    _lora(model, target_modules=["lm_head"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head.*shared with \['transformer\.wte\.weight'\]"):
        fa.merge(model)
    assert_state_identical(snapshot(model), before)


def test_merge_without_an_active_adapter_or_a_patch_says_what_to_do():
    with pytest.raises(ValueError, match=r"call fastadapters\.patch"):
        fa.merge(tiny_model("llama"))
    model = _lora(tiny_model("llama"))
    fa.set_adapter(model, None)
    with pytest.raises(ValueError, match=r"no adapter is active; pass name=\.\.\. \(loaded: \['default'\]\)"):
        fa.merge(model)
    with pytest.raises(ValueError, match=r"no adapter named 'x'"):
        fa.merge(model, "x")
    fa.merge(model, "default")
    assert "_fastadapters" not in model.__dict__


# ----------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("spelling", [dict(adapter="lora"), dict(adapter="parallel"), dict(adapter="prefix")])
def test_save_pretrained_of_a_patched_model_refuses_and_writes_nothing(tmp_path, spelling):
    model = fa.patch(tiny_model("llama"), **spelling)
    with pytest.raises(RuntimeError, match=r"nothing was written.*save_adapter.*merge_and_unload.*unpatch"):
        model.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_saved_folder_reloads_in_plain_transformers(tmp_path):
    import transformers as T

    ids = input_ids()
    model = tiny_model("llama")
    with torch.no_grad():
        base = model(input_ids=ids).logits
    _lora(model)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    assert (patched - base).abs().max() > 1e-3  # the adapter does something
    fa.merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(reloaded, patched, rtol=1e-5, atol=1e-5)

    model = _lora(tiny_model("llama"))
    fa.unpatch(model)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base")(input_ids=ids).logits
    torch.testing.assert_close(reloaded, base, rtol=0, atol=0)


def test_a_failed_patch_or_the_last_delete_gives_save_pretrained_back():
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        fa.patch(model, adapter="lora", target_modules=["nope"])
    assert "save_pretrained" not in model.__dict__
    fa.patch(model, adapter="lora")
    fa.delete_adapter(model, "default")
    assert "save_pretrained" not in model.__dict__


def test_merge_inside_route_is_refused():
    model = _lora(tiny_model("llama"))
    before = snapshot(model)
    with fa.route(model, ["default", None]):
        with pytest.raises(ValueError, match=r"inside fastadapters\.route"):
            fa.merge(model)
    assert fa.adapter_names(model) == ["default"]
    assert_state_identical(snapshot(model), before)


@pytest.mark.parametrize("arch, rslora", [("llama", False), ("gpt2", True)])
def test_merged_state_dict_equals_peft_merge_and_unload(arch, rslora):
    peft = pytest.importorskip("peft")
    ours = _lora(tiny_model(arch), r=4, alpha=8, use_rslora=rslora)
    targets = sorted({p.rsplit(".", 1)[-1] for p in ours._fastadapters.kinds["default"]})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora,
                          fan_in_fan_out=(arch == "gpt2"), bias="none")
    theirs = peft.get_peft_model(tiny_model(arch), cfg)
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora_" in n:
                named[f"base_model.model.{n}"].copy_(p)
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = fa.merge_and_unload(ours).state_dict()
    assert list(merged_ours) == list(merged_theirs)
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_theirs[k], rtol=1e-6, atol=1e-6, msg=k)


def test_a_copied_or_pickled_patched_model_still_refuses_and_unpatches(tmp_path):
    import copy
    import io as _io

    model = _lora(tiny_model("llama"))
    buf = _io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        with pytest.raises(RuntimeError, match="nothing was written"):
            other.save_pretrained(tmp_path / "x")
        fa.unpatch(other)
        assert "save_pretrained" not in other.__dict__
    assert not os.path.exists(tmp_path / "x")


def _as_transformers_leaves_a_dequantized_gguf_model(model):
    """What ``from_pretrained(..., gguf_file=...)`` leaves on a model whose GGUF blocks it dequantized
    (transformers 5.2x on a CPU, SmolLM2's Q4_1 file): float weights, yet its GGUF quantizer and
    config kept -- so save_pretrained refuses it."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.is_quantized = True
    model.config.quantization_config = GgufConfig()
    return model


def test_merge_and_unload_of_a_dequantized_gguf_model_saves(tmp_path):
    """Issue 20: merge_and_unload + save_pretrained on a GGUF-loaded model raised transformers'
    "quantized with gguf" error; merge_and_unload now drops the marker of a model whose every tensor
    is a float, and the saved folder reloads with the merged outputs."""
    import transformers as T

    pytest.importorskip("transformers.quantizers.quantizer_gguf")
    ids = input_ids()
    model = _as_transformers_leaves_a_dequantized_gguf_model(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"(?i)quantized with (QuantizationMethod\.)?gguf"):  # 5.17 prints the enum
        model.save_pretrained(tmp_path / "refused")  # the failure the issue reports, before any adapter
    _lora(model)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    fa.merge_and_unload(model)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    with torch.no_grad():
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(reloaded, patched, rtol=1e-5, atol=1e-5)


def test_a_gguf_model_kept_in_blocks_keeps_its_marker():
    from fastadapters.merging import drop_dequantized_gguf_marker

    model = _as_transformers_leaves_a_dequantized_gguf_model(tiny_model("llama"))
    model.register_buffer("packed_block", torch.zeros(4, dtype=torch.uint8))
    assert drop_dequantized_gguf_marker(model) is False
    assert model.hf_quantizer is not None and model.is_quantized
