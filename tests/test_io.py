"""Adapter files (fastadapters/io.py): round trips, PEFT both ways, LLM-Adapters checkpoints,
atomic writes, and files that do not fit (the model must be left exactly as it was)."""
from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch

import fastadapters as fa
from fastadapters import io as faio
from fastadapters import patching

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64], [3, 3, 70, 12, 8, 91, 40]])


def _config(arch: str, **over):
    import transformers as tf

    small = dict(vocab_size=100)
    if arch == "llama":
        return tf.LlamaConfig(**small, hidden_size=over.get("hidden", 32), intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "opt":
        return tf.OPTConfig(**small, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, word_embed_proj_dim=32)
    if arch == "bloom":
        return tf.BloomConfig(**small, hidden_size=32, n_layer=2, n_head=4)
    if arch == "gptj":
        return tf.GPTJConfig(**small, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
    if arch == "gpt2":
        return tf.GPT2Config(**small, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    raise AssertionError(arch)


@functools.lru_cache(maxsize=None)
def _built(arch: str, hidden: int = 32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(arch, hidden=hidden)).eval()


def fresh(arch: str = "llama", hidden: int = 32):
    """A new instance with the same random base weights every time."""
    return copy.deepcopy(_built(arch, hidden))


def randomize(model, name: str = "default", seed: int = 1) -> None:
    """Give every parameter of adapter ``name`` random values (LoRA B starts at zero, scaling at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in patching._adapter_params(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 0 else 0.0))


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, names=()):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert fa.adapter_names(model) == list(names)


# ---------------------------------------------------------------------------------------------
# round trips in our format
# ---------------------------------------------------------------------------------------------

ROUND_TRIPS = {
    "lora": ("llama", dict(adapter="lora", r=4, alpha=8, dropout=0.05), "model.layers.0.self_attn.q_proj.lora_A.weight"),
    "houlsby": ("llama", dict(adapter="series", variant="houlsby", bottleneck_size=8),
                "model.layers.1.mlp.gate_proj.adapter_up.weight"),
    "pfeiffer": ("opt", dict(adapter="series", variant="pfeiffer", bottleneck_size=8, non_linearity="relu"),
                 "model.decoder.layers.0.fc2.adapter_down.weight"),
    "parallel-learned": ("llama", dict(adapter="parallel", bottleneck_size=8, scaling="learned"),
                         "model.layers.0.self_attn.k_proj.adapter_scaling"),
    "prefix": ("llama", dict(adapter="prefix", num_virtual_tokens=3), "prefix_encoder.embedding.weight"),
    "prefix-projection": ("llama", dict(adapter="prefix", num_virtual_tokens=3, prefix_projection=True,
                                        encoder_hidden_size=16), "prefix_encoder.transform.2.weight"),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip(tmp_path, case):
    arch, fields, key = ROUND_TRIPS[case]
    model = fa.patch(fresh(arch), **fields)
    randomize(model)
    want = logits(model)
    assert not torch.allclose(want, logits(fresh(arch)))  # the adapter does something
    fa.save_adapter(model, tmp_path)

    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["format"] == "fastadapters" and meta["adapter_type"] == fields["adapter"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert key in keys and not any(".default." in k for k in keys)

    other = fresh(arch)
    fa.load_adapter(other, tmp_path)
    assert fa.get_config(other).to_dict() == fa.get_config(model).to_dict()
    assert torch.equal(logits(other), want)
    # loading again into the same adapter replaces its weights
    randomize(other, seed=7)
    fa.load_adapter(other, tmp_path)
    assert torch.equal(logits(other), want)


def test_two_named_adapters_side_by_side(tmp_path):
    src = fa.patch(fresh(), adapter="lora", r=4, name="a")
    fa.patch(src, adapter="series", variant="houlsby", bottleneck_size=8, name="b")
    randomize(src, "a", seed=1)
    randomize(src, "b", seed=2)
    want = {}
    for n in ("a", "b"):
        fa.set_adapter(src, n)
        want[n] = logits(src)
        fa.save_adapter(src, tmp_path / n)  # the active one
    model = fresh()
    fa.load_adapter(model, tmp_path / "a", name="a")
    fa.load_adapter(model, tmp_path / "b", name="b")
    assert fa.adapter_names(model) == ["a", "b"]
    for n in ("a", "b"):
        fa.set_adapter(model, n)
        assert torch.equal(logits(model), want[n])
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        fa.save_adapter(model, tmp_path / "c", name="c")


# ---------------------------------------------------------------------------------------------
# PEFT both ways
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "gptj", "gpt2"])
def test_peft_both_ways(tmp_path, arch):
    peft = pytest.importorskip("peft")
    # ours -> PEFT
    ours = fa.patch(fresh(arch), adapter="lora", r=4, alpha=8, dropout=0.05)
    randomize(ours)
    fa.save_adapter(ours, tmp_path / "ours", format="peft")
    meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["fan_in_fan_out"] == (arch == "gpt2")
    theirs = peft.PeftModel.from_pretrained(fresh(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
    back = fa.load_adapter(fresh(arch), tmp_path / "ours")  # and our reader takes our PEFT export
    assert torch.equal(logits(back), logits(ours))

    # PEFT -> ours
    targets = fa.models.default_targets(fresh(arch), "lora")
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                          fan_in_fan_out=(arch == "gpt2"), task_type="CAUSAL_LM")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(fresh(arch), cfg).eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    model = fa.load_adapter(fresh(arch), tmp_path / "theirs")
    assert fa.get_config(model).r == 3 and fa.get_config(model).alpha == 6
    torch.testing.assert_close(logits(model), logits(theirs), rtol=1e-5, atol=1e-5)


def test_peft_format_refuses_bottleneck_adapters(tmp_path):
    model = fa.patch(fresh(), adapter="parallel", bottleneck_size=4)
    with pytest.raises(ValueError, match="supports LoRA and prefix-tuning adapters; adapter .default. is .parallel."):
        fa.save_adapter(model, tmp_path, format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


def _write_peft_lora(path, tensors, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({faio.PEFT_PREFIX + k: v for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "bias": "none",
         "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", **cfg}))


def test_peft_layers_subset_and_regex_targets(tmp_path):
    # weights for one layer only, targets as a regex: the adapter goes exactly where the file has weights
    q = "model.layers.1.self_attn.q_proj"
    A, B = torch.randn(2, 32), torch.randn(32, 2)
    _write_peft_lora(tmp_path, {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": B},
                     target_modules=r".*\.1\.self_attn\.q_proj")
    model = fa.load_adapter(fresh(), tmp_path)
    assert list(patching._state(model).kinds["default"]) == [q]
    lin = model.get_submodule(q)
    x = torch.randn(5, 32)
    torch.testing.assert_close(lin(x), lin.base_layer(x) + 2.0 * (x @ A.t() @ B.t()))


def test_llm_adapters_lora_bin(tmp_path):
    # the fork's LoRA checkpoints: PEFT keys in adapter_model.bin, its older config fields
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i in range(2):
        for proj, out in (("q_proj", 32), ("v_proj", 16)):
            pre = f"model.layers.{i}.self_attn.{proj}"
            sd[f"{pre}.lora_A.weight"] = torch.randn(4, 32, generator=g)
            sd[f"{pre}.lora_B.weight"] = torch.randn(out, 4, generator=g)
    torch.save({faio.PEFT_PREFIX + k: v for k, v in sd.items()}, str(tmp_path / "adapter_model.bin"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "yahma/llama-7b-hf", "bias": "none", "enable_lora": None,
         "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05,
         "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": 4,
         "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    model = fa.load_adapter(fresh(), tmp_path)
    assert fa.get_config(model).target_modules == ["q_proj", "v_proj"]
    pre = "model.layers.1.self_attn.v_proj"
    lin, x = model.get_submodule(pre), torch.randn(3, 32)
    want = lin.base_layer(x) + 4.0 * (x @ sd[f"{pre}.lora_A.weight"].t() @ sd[f"{pre}.lora_B.weight"].t())
    torch.testing.assert_close(lin(x), want)


# ---------------------------------------------------------------------------------------------
# LLM-Adapters checkpoints
# ---------------------------------------------------------------------------------------------

def _write_llm_adapters(path, layers: int, **cfg):
    """A checkpoint as the LLM-Adapters fork writes it (get_peft_model_state_dict + torch.save)."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    b = cfg["bottleneck_size"]
    for i in range(layers):
        pre = f"base_model.model.model.layers.{i}."
        if cfg.get("use_parallel_adapter"):
            for proj in cfg["target_modules"]:
                sd[pre + f"self_attn.{proj}.adapter_down.weight"] = torch.randn(b, 32, generator=g) * 0.3
                out = 16 if proj in ("k_proj", "v_proj") else 32  # 2 kv heads of 8
                sd[pre + f"self_attn.{proj}.adapter_up.weight"] = torch.randn(out, b, generator=g) * 0.3
                if cfg.get("scaling") == "learned":
                    sd[pre + f"self_attn.{proj}.adapter_scaling"] = torch.tensor([0.5 + i])  # the fork's (1,)
        else:
            for proj, d in (("gate_proj", 32), ("up_proj", 32), ("down_proj", 32)):  # mh: in; output: out
                if proj not in cfg["target_modules"]:
                    continue
                sd[pre + f"mlp.{proj}.adapter_down.weight"] = torch.randn(b, d, generator=g) * 0.3
                sd[pre + f"mlp.{proj}.adapter_up.weight"] = torch.randn(d, b, generator=g) * 0.3
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path / "adapter_model.bin"))
    meta = {"base_model_name_or_path": "yahma/llama-7b-hf", "bias": "none", "bottleneck_size": b,
            "adapter_dropout": 0.0, "inference_mode": True, "init_weights": "bert", "modules_to_save": None,
            "non_linearity": "tanh", "peft_type": "BOTTLENECK", "scaling": 1.0, "task_type": "CAUSAL_LM",
            "use_adapterp": False, "use_parallel_adapter": False}
    meta.update(cfg)
    (path / "adapter_config.json").write_text(json.dumps(meta))
    return {k[len("base_model.model."):]: v for k, v in sd.items()}


def test_llm_adapters_houlsby(tmp_path):
    sd = _write_llm_adapters(tmp_path, 2, bottleneck_size=8, non_linearity="relu",
                             target_modules=["gate_proj", "up_proj", "down_proj"])
    model = fa.load_adapter(fresh(), tmp_path)
    cfg = fa.get_config(model)
    assert isinstance(cfg, fa.SeriesConfig) and cfg.variant == "houlsby" and cfg.non_linearity == "relu"
    for proj, width in (("gate_proj", 32), ("down_proj", 64)):
        path = f"model.layers.1.mlp.{proj}"
        lin = model.get_submodule(path)
        D, U = sd[f"{path}.adapter_down.weight"], sd[f"{path}.adapter_up.weight"]

        def f(z):
            return torch.relu(z @ D.t()) @ U.t()

        x = torch.randn(3, width)
        if proj == "gate_proj":  # mh_adapter: y = W(x + f(x)) + b
            want = lin.base_layer(x + f(x))
        else:  # output_adapter: h = Wx + b; y = h + f(h)
            h = lin.base_layer(x)
            want = h + f(h)
        torch.testing.assert_close(lin(x), want)


def test_llm_adapters_parallel_learned_and_pfeiffer(tmp_path):
    sd = _write_llm_adapters(tmp_path / "par", 2, bottleneck_size=4, use_parallel_adapter=True, scaling="learned",
                             target_modules=["q_proj", "k_proj", "v_proj"])
    model = fa.load_adapter(fresh(), tmp_path / "par", name="par")
    assert isinstance(fa.get_config(model, "par"), fa.ParallelConfig)
    path = "model.layers.1.self_attn.v_proj"
    lin = model.get_submodule(path)
    x = torch.randn(3, 32)
    D, U = sd[f"{path}.adapter_down.weight"], sd[f"{path}.adapter_up.weight"]
    torch.testing.assert_close(lin(x), lin.base_layer(x) + 1.5 * (torch.tanh(x @ D.t()) @ U.t()))
    # AdapterP beside it, loaded from the fork's use_adapterp flag
    _write_llm_adapters(tmp_path / "p", 2, bottleneck_size=4, use_adapterp=True, target_modules=["down_proj"])
    fa.load_adapter(model, tmp_path / "p", name="p")
    assert fa.get_config(model, "p").variant == "pfeiffer"
    assert patching._state(model).kinds["p"] == {f"model.layers.{i}.mlp.down_proj": "output" for i in range(2)}


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def test_atomic_write_failure_leaves_old_files(tmp_path, monkeypatch):
    model = fa.patch(fresh(), adapter="lora", r=4)
    randomize(model, seed=1)
    fa.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"adapter_model.safetensors", "adapter_config.json"}
    randomize(model, seed=2)

    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fa.save_adapter(model, tmp_path)
    monkeypatch.undo()
    # a failure after the temporary file is written (before the rename) leaves no trace either
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fa.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, old bytes

    fa.save_adapter(model, tmp_path)  # and a good write replaces both
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------------------------------
# files that do not fit: clear errors, model unchanged
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def saved_lora(tmp_path):
    model = fa.patch(fresh(), adapter="lora", r=4)
    randomize(model)
    return fa.save_adapter(model, tmp_path / "lora")


@pytest.mark.parametrize("damage", ["truncate", "header", "json"])
def test_corrupt_files(saved_lora, damage):
    wfile = os.path.join(saved_lora, "adapter_model.safetensors")
    if damage == "truncate":
        data = open(wfile, "rb").read()
        open(wfile, "wb").write(data[: len(data) // 2])
        match = "adapter_model.safetensors: not a valid safetensors file"
    elif damage == "header":
        data = bytearray(open(wfile, "rb").read())
        data[8:20] = b"\xff" * 12
        open(wfile, "wb").write(bytes(data))
        match = "adapter_model.safetensors: not a valid safetensors file"
    else:
        cfile = os.path.join(saved_lora, "adapter_config.json")
        open(cfile, "w").write(open(cfile).read()[:-20])
        match = "adapter_config.json: not valid JSON"
    model = fa.patch(fresh(), adapter="parallel", bottleneck_size=4, name="keep")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fa.load_adapter(model, saved_lora, name="new")
    assert_unchanged(model, before, ["keep"])


def test_shape_mismatch_names_key_and_shapes(saved_lora):
    model = fresh(hidden=48)  # same family, wider: every LoRA A is (4, 48)
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        fa.load_adapter(model, saved_lora)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in msg and "[4, 32]" in msg and "[4, 48]" in msg
    assert_unchanged(model, before)
    assert patching._state(model) is None


def test_key_that_fits_no_module(tmp_path):
    _write_peft_lora(tmp_path, {"model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
                                "model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)})
    model = fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'model\.layers\.7\.self_attn\.q_proj\.lora_A\.weight' fits no module"):
        fa.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_missing_weights_are_named(saved_lora):
    from safetensors.torch import load_file, save_file

    wfile = os.path.join(saved_lora, "adapter_model.safetensors")
    sd = load_file(wfile)
    del sd["model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(sd, wfile)
    model = fa.patch(fresh(), adapter="lora", r=4, name="other")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lacks adapter weights.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        fa.load_adapter(model, saved_lora)
    assert_unchanged(model, before, ["other"])


def test_existing_adapter_with_other_config_is_refused(saved_lora):
    model = fa.patch(fresh(), adapter="lora", r=4, alpha=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"differs .* in \['alpha'\]"):
        fa.load_adapter(model, saved_lora)
    assert_unchanged(model, before, ["default"])


def test_truncated_llm_adapters_bin(tmp_path):
    _write_llm_adapters(tmp_path, 2, bottleneck_size=4, target_modules=["down_proj"], use_adapterp=True)
    data = (tmp_path / "adapter_model.bin").read_bytes()
    (tmp_path / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    model = fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.bin: could not be read"):
        fa.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("others", [(), ("keep",)])
def test_failure_after_patching_is_rolled_back(saved_lora, monkeypatch, others):
    model = fresh()
    for n in others:
        fa.patch(model, adapter="series", variant="pfeiffer", bottleneck_size=4, name=n)
    before = snapshot(model)

    def boom(*a, **k):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(faio, "_adapter_entries", boom)
    with pytest.raises(RuntimeError, match="copy failed"):
        fa.load_adapter(model, saved_lora, name="new")
    assert_unchanged(model, before, others)
    if not others:
        assert patching._state(model) is None and "forward" not in model.__dict__


def test_unknown_format(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="unknown adapter format"):
        fa.load_adapter(fresh(), tmp_path)


def test_load_adapter_without_a_name_registers_default_whatever_it_was_saved_as(tmp_path):
    """Decided in issue 20: the name is the caller's. Files record none, so ``load_adapter`` without
    ``name=`` registers "default" (PEFT's convention) for an adapter saved as "houlsby"; ``name=``
    picks any other, and a second adapter of another config under the same default name is refused
    with the way out named."""
    import fastadapters as fa
    from tiny_models import tiny_model

    src = tiny_model("llama")
    fa.patch(src, adapter="series", variant="houlsby", bottleneck_size=4, name="houlsby")
    fa.patch(src, adapter="lora", r=2, name="mine")
    houlsby = fa.save_adapter(src, tmp_path / "houlsby", name="houlsby")
    lora = fa.save_adapter(src, tmp_path / "lora", name="mine")
    assert "mine" not in (tmp_path / "lora" / "adapter_config.json").read_text()  # no name on disk

    model = tiny_model("llama")
    fa.load_adapter(model, houlsby)
    assert list(model._fastadapters.configs) == ["default"] and model._fastadapters.active == "default"
    fa.load_adapter(model, houlsby, name="houlsby")
    assert set(model._fastadapters.configs) == {"default", "houlsby"}
    with pytest.raises(ValueError, match="pick another name"):
        fa.load_adapter(model, lora)  # "default" holds a series adapter: not replaced by a LoRA
    assert set(model._fastadapters.configs) == {"default", "houlsby"}
