"""patch / unpatch / named adapters on tiny models, and the series and parallel adapters end to end.

The series/parallel checks restate the LLM-Adapters formulas independently: the *unpatched* base
model gets forward hooks that replace each target linear's output by the formula (fp64, from the
adapter weights read out of the patched model's state dict), and must give the patched model's
logits. Placements per architecture come from the table in fastadapters.models and are spelled out
here for llama.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fastadapters as fa
from tiny_models import ARCHS, assert_state_identical, input_ids, snapshot, tiny_model
from fastadapters import models
from fastadapters.layers import AdapterLinear, PrefixEncoder

ACTS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": lambda t: 0.5 * t * (1.0 + torch.erf(t / 2 ** 0.5)),
    "silu": lambda t: t * torch.sigmoid(t),
    "swish": lambda t: t * torch.sigmoid(t),
    "sigmoid": torch.sigmoid,
}


def module_types(model):
    return {n: type(m) for n, m in model.named_modules()}


def grad_flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def weight_nk(mod):
    """(out, in) weight of an nn.Linear or a transformers Conv1D (stored (in, out))."""
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.t()


def expected_kinds(arch, adapter, variant=None):
    """{target suffix: placement} from the table: what every target of the default should get."""
    arch_row = models.ARCHITECTURES[arch]
    if adapter == "parallel":
        return {t: "parallel" for t in arch_row.parallel}
    if variant == "pfeiffer":
        return {t: "output" for t in arch_row.pfeiffer}
    return {t: ("output" if t in arch_row.ffn_output else "mh") for t in arch_row.series}


def adapted_paths(model, name="default"):
    """{module path: (down shape, up shape)} read from the state dict."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith(f".adapter_down.{name}.weight"):
            path = k[: -len(f".adapter_down.{name}.weight")]
            out[path] = (tuple(v.shape), tuple(sd[f"{path}.adapter_up.{name}.weight"].shape))
    return out


# ----------------------------------------------------------------------------- placements
LLAMA_KINDS = {
    ("series", "houlsby"): {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"},
    ("series", "pfeiffer"): {"down_proj": "output"},
    ("parallel", None): {"q_proj": "parallel", "k_proj": "parallel", "v_proj": "parallel"},
}


def test_llama_placements_spelled_out():
    for (adapter, variant), kinds in LLAMA_KINDS.items():
        assert expected_kinds("llama", adapter, variant) == kinds


@pytest.mark.parametrize("arch", ARCHS)
def test_default_placements_per_architecture(arch):
    model = tiny_model(arch)
    before = snapshot(model)
    b = 3
    for adapter, variant in (("series", "houlsby"), ("series", "pfeiffer"), ("parallel", None)):
        kw = {"variant": variant} if variant else {}
        fa.patch(model, adapter=adapter, bottleneck_size=b, **kw)
        kinds = expected_kinds(arch, adapter, variant)
        got = adapted_paths(model)
        # every target suffix is adapted in every layer, nothing else is
        assert got and all(models.matches(p, kinds) for p in got)
        for t in kinds:
            assert sum(models.matches(p, [t]) for p in got) == 2, (t, sorted(got))  # 2 layers
        for path, (down, up) in got.items():
            base = model.get_submodule(path).base_layer
            n, k = weight_nk(base).shape
            kind = next(kd for t, kd in kinds.items() if models.matches(path, [t]))
            d_in, d_out = {"mh": (k, k), "output": (n, n), "parallel": (k, n)}[kind]
            assert down == (b, d_in) and up == (d_out, b), (path, kind)
        _forward_backward_smoke(model)
        fa.unpatch(model)
    fa.patch(model, adapter="lora", r=2)
    _forward_backward_smoke(model)
    fa.unpatch(model)
    assert_state_identical(before, snapshot(model))


def _forward_backward_smoke(model):
    """One train-mode step's forward and backward: every trainable parameter gets a gradient."""
    model.train()
    ids = input_ids(2, 5)
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    model.zero_grad(set_to_none=True)
    model.eval()


# ----------------------------------------------------------------------------- formulas, restated
def restating_hooks(base_model, patched, name="default"):
    """Hooks on base_model's target linears that return the adapter formula in fp64 (see module doc)."""
    sd = patched.state_dict()
    arch = base_model.config.model_type
    hooks = []
    for path in adapted_paths(patched, name):
        cfg = fa.get_config(patched, name)
        variant = getattr(cfg, "variant", None)
        kinds = {t: k for t, k in expected_kinds(arch, cfg.adapter_type, variant).items()}
        kind = next(kd for t, kd in kinds.items() if models.matches(path, [t]))
        D = sd[f"{path}.adapter_down.{name}.weight"].double()
        U = sd[f"{path}.adapter_up.{name}.weight"].double()
        s = sd[f"{path}.adapter_scaling.{name}"].double() if cfg.scaling == "learned" else cfg.scaling
        act = ACTS[cfg.non_linearity]
        mod = base_model.get_submodule(path)
        W = weight_nk(mod).detach().double()
        bias = None if mod.bias is None else mod.bias.detach().double()

        def formula(m, args, out, D=D, U=U, s=s, act=act, W=W, bias=bias, kind=kind):
            x = args[0].double()
            lin = lambda t: t @ W.T if bias is None else t @ W.T + bias
            f = lambda z: s * (act(z @ D.T) @ U.T)
            if kind == "mh":
                y = lin(x + f(x))
            elif kind == "output":
                h = lin(x)
                y = h + f(h)
            else:
                y = lin(x) + f(x)
            return y.to(out.dtype)

        hooks.append(mod.register_forward_hook(formula))
    return hooks


CASES = [
    ("llama", dict(adapter="series", variant="houlsby")),
    ("llama", dict(adapter="series", variant="pfeiffer", non_linearity="relu", scaling=0.5)),
    ("llama", dict(adapter="parallel", non_linearity="gelu", scaling="learned")),
    ("llama", dict(adapter="series", variant="houlsby", non_linearity="silu", scaling="learned")),
    ("llama", dict(adapter="parallel", non_linearity="sigmoid", scaling=2.0)),
    ("gpt2", dict(adapter="series", variant="houlsby", non_linearity="swish")),
    ("gpt2", dict(adapter="parallel")),
    ("bloom", dict(adapter="series", variant="pfeiffer", scaling="learned")),
    ("opt", dict(adapter="series", variant="houlsby")),
]


@pytest.mark.parametrize("arch,kw", CASES, ids=[f"{a}-{'-'.join(map(str, k.values()))}" for a, k in CASES])
def test_series_and_parallel_match_restated_formulas(arch, kw):
    patched = tiny_model(arch)
    fa.patch(patched, bottleneck_size=5, **kw)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # weights large enough that every branch matters
        for n, p in patched.named_parameters():
            if ".adapter_down." in n or ".adapter_up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif ".adapter_scaling." in n:
                p.fill_(1.7)
    base = tiny_model(arch)
    ids = input_ids(2, 7)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        hooks = restating_hooks(base, patched)
        expected = base(input_ids=ids).logits
        for h in hooks:
            h.remove()
        got = patched(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- init
def test_bert_init_statistics():
    model = tiny_model("llama")
    fa.patch(model, adapter="series", bottleneck_size=64)  # init="bert" is the default
    w = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                   if ".adapter_down." in n or ".adapter_up." in n])
    assert w.numel() > 10000
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    # learned scaling: one trainable scalar per adapted linear, initialised to 1, in the state dict
    fa.patch(model, adapter="parallel", scaling="learned", name="p")
    scal = {k: v for k, v in model.state_dict().items() if ".adapter_scaling.p" in k}
    assert len(scal) == 6 and all(v.shape == () and v.item() == 1.0 for v in scal.values())


def test_lora_init_is_peft_kaiming_uniform():
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", r=16)
    A = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".lora_A." in n])
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_model_level_dropout_only_in_train_mode():
    model = tiny_model("llama")
    fa.patch(model, adapter="series", dropout=0.5, bottleneck_size=8)
    ids = input_ids(2, 7)
    with torch.no_grad():
        e1, e2 = model(input_ids=ids).logits, model(input_ids=ids).logits
        model.train()
        t1, t2 = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(e1, e2) and not torch.equal(t1, t2)


@pytest.mark.parametrize("kw", [dict(adapter="series", variant="houlsby"), dict(adapter="series", variant="pfeiffer"),
                                dict(adapter="parallel"), dict(adapter="lora", r=4)],
                         ids=["houlsby", "pfeiffer", "parallel", "lora"])
def test_identity_init_equals_base(kw):
    """init="zero_up" (and LoRA's zero B) make the patched model compute the base model."""
    model = tiny_model("llama")
    if kw["adapter"] != "lora":
        kw = dict(kw, init="zero_up", bottleneck_size=8)
    fa.patch(model, **kw)
    sd = model.state_dict()
    downs = [v for k, v in sd.items() if ".adapter_down." in k or ".lora_A." in k]
    ups = [v for k, v in sd.items() if ".adapter_up." in k or ".lora_B." in k]
    assert downs and all(d.abs().sum() > 0 for d in downs) and all(torch.all(u == 0) for u in ups)
    if kw["adapter"] != "lora":
        for k, v in sd.items():
            if ".adapter_down." in k:  # Kaiming-uniform: |D| <= 1/sqrt(fan_in)
                assert v.abs().max() <= 1 / math.sqrt(v.shape[1]) + 1e-7
    else:
        for k, v in sd.items():
            if ".lora_A." in k:
                assert v.abs().max() <= 1 / math.sqrt(v.shape[1]) + 1e-7
    ids = input_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits,
                                   rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- patch / unpatch
def _train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = input_ids(4, 10, seed=8)
    torch.manual_seed(0)  # dropout draws: the same run every time
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    return losses


ADAPTERS = {
    "lora": dict(adapter="lora", r=4, alpha=8, dropout=0.05),
    "houlsby": dict(adapter="series", variant="houlsby", bottleneck_size=8, scaling="learned", dropout=0.1),
    "pfeiffer": dict(adapter="series", variant="pfeiffer", bottleneck_size=8, non_linearity="relu"),
    "parallel": dict(adapter="parallel", bottleneck_size=8, init="zero_up"),
    "prefix": dict(adapter="prefix", num_virtual_tokens=4),
    "prefix_proj": dict(adapter="prefix", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_train_then_unpatch_restores_everything(kind):
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)  # a user's own flag must come back as it was
    before = snapshot(model)
    types = module_types(model)
    flags = grad_flags(model)
    fa.patch(model, **ADAPTERS[kind])

    # only adapter parameters train, and trainable_parameters counts exactly them
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "adapter_" in n or "fastadapters_prefix" in n) for n in trainable)
    count = fa.trainable_parameters(model)
    assert count.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert "trainable params" in str(count)

    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train_steps(model)
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        if n in adapter_before:
            assert not torch.equal(p, adapter_before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, base_before[n]), f"base parameter {n} changed"

    fa.unpatch(model)
    assert_state_identical(before, snapshot(model))
    assert module_types(model) == types
    assert grad_flags(model) == flags
    assert "forward" not in model.__dict__ and "_fastadapters" not in model.__dict__
    assert fa.adapter_names(model) == []


def test_unpatch_after_several_adapters_and_repatch():
    model = tiny_model("gpt2")
    before, types, flags = snapshot(model), module_types(model), grad_flags(model)
    fa.patch(model, adapter="lora", r=2, name="a")
    fa.patch(model, adapter="series", bottleneck_size=3, name="b")
    fa.patch(model, adapter="prefix", num_virtual_tokens=2, name="c")
    fa.patch(model, adapter="parallel", bottleneck_size=3, name="d")
    assert fa.adapter_names(model) == ["a", "b", "c", "d"]
    fa.unpatch(model)
    assert_state_identical(before, snapshot(model))
    assert module_types(model) == types and grad_flags(model) == flags
    fa.patch(model, adapter="lora", r=2)  # a fresh patch works on the restored model
    fa.unpatch(model)
    assert_state_identical(before, snapshot(model))


# ----------------------------------------------------------------------------- named adapters
def test_two_named_adapters_on_one_linear():
    ids = input_ids(2, 7)
    model = tiny_model("llama")
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    fa.patch(model, adapter="lora", r=4, name="lo")
    fa.patch(model, adapter="parallel", bottleneck_size=4, name="par")  # q_proj, k_proj, v_proj
    q = model.model.layers[0].self_attn.q_proj
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.lora_A.lo.weight" in sd
    assert "model.layers.0.self_attn.q_proj.adapter_down.par.weight" in sd
    assert type(q).__name__ == "AdapterLinear"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or ".adapter_up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    def trainable_names():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    # the first adapter is active, and only it trains
    assert all(".lo." in n for n in trainable_names())
    out_lo = logits()
    fa.set_adapter(model, "par")
    assert trainable_names() and all(".par." in n for n in trainable_names())
    out_par = logits()
    fa.set_adapter(model, None)
    torch.testing.assert_close(logits(), base_logits, rtol=0, atol=0)
    fa.set_adapter(model, "lo")
    torch.testing.assert_close(logits(), out_lo, rtol=0, atol=0)
    for a, b in ((out_lo, base_logits), (out_par, base_logits), (out_lo, out_par)):
        assert not torch.allclose(a, b, atol=1e-3)

    # each adapter alone on a fresh model with the same weights gives the same outputs
    for name, kw, out in (("lo", dict(adapter="lora", r=4), out_lo),
                          ("par", dict(adapter="parallel", bottleneck_size=4), out_par)):
        alone = tiny_model("llama")
        fa.patch(alone, name=name, **kw)
        ours = {k: v for k, v in model.state_dict().items() if f".{name}." in k}
        missing = alone.load_state_dict(ours, strict=False)
        assert not missing.unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(alone(input_ids=ids).logits, out, rtol=1e-6, atol=1e-6)

    # delete_adapter removes its parameters; the other keeps working
    fa.delete_adapter(model, "lo")
    assert fa.adapter_names(model) == ["par"]
    assert not any(".lo." in k for k in model.state_dict())
    torch.testing.assert_close(logits(), out_par, rtol=0, atol=0)
    assert fa.get_config(model).adapter_type == "parallel"
    fa.delete_adapter(model, "par")  # the last one: the model is unpatched
    assert fa.adapter_names(model) == []
    assert_state_identical(snapshot(tiny_model("llama")), snapshot(model))


def test_config_object_and_backend_argument(monkeypatch):
    model = tiny_model("llama")
    cfg = fa.SeriesConfig(variant="pfeiffer", bottleneck_size=4, target_modules=["down_proj"])
    fa.patch(model, config=cfg, backend="torch")
    assert fa.get_config(model) == cfg and fa.get_config(model) is not cfg
    ids = input_ids(1, 5)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    fa.set_backend(model, "cuda")  # CPU tensors: an explicit cuda backend says why it cannot run
    with pytest.raises(RuntimeError, match="cuda"):
        model(input_ids=ids)
    fa.set_backend(model, None)
    fa.patch(model, adapter="lora", r=2, name="second", backend="cuda")  # a later patch's backend applies
    with pytest.raises(RuntimeError, match="cuda"):
        model(input_ids=ids)
    fa.delete_adapter(model, "second")
    fa.set_backend(model, None)
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        model(input_ids=ids)
    monkeypatch.setenv("FASTADAPTERS_BACKEND", "torch")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_cpp_is_refused_as_a_models_backend_before_anything_changes():
    """'cpp' is the routed multi-adapter kernel only: a model set to it would fail every single-adapter
    forward, so patch and set_backend refuse it up front, naming what is valid and where cpp goes."""
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"backend: got 'cpp' for a model; valid: auto, torch, triton, cuda, or "
                                         r"None \('cpp' is the CPU kernel of mixed-adapter batches only"):
        fa.patch(model, adapter="lora", r=2, backend="cpp")
    assert fa.adapter_names(model) == []
    assert_state_identical(before, snapshot(model))
    fa.patch(model, adapter="lora", r=2)
    with pytest.raises(ValueError, match="got 'cpp' for a model"):
        fa.set_backend(model, "cpp")
    with pytest.raises(ValueError, match="got 'cpp' for a model"):
        fa.patch(model, adapter="lora", r=2, name="second", backend="cpp")
    assert fa.adapter_names(model) == ["default"]
    ids = input_ids(1, 5)
    with torch.no_grad():
        model(input_ids=ids)  # still runs: its backend is as it was


def test_patch_and_set_adapter_walk_the_model_without_the_adapters_already_loaded(monkeypatch):
    """The walks of patch / set_adapter visit the base model's modules and the wrappers, never the
    adapters inside them, and set_adapter walks it once: their cost does not grow with the adapters
    a server has loaded (it grew quadratically over a server's loads before)."""
    from fastadapters import patching

    model = tiny_model("llama")
    fa.patch(model, adapter="lora", r=2, name="a0")
    visited = len(list(patching._modules_to_wrappers(model)))
    for i in range(1, 8):
        kind = dict(adapter="houlsby", bottleneck_size=4) if i % 2 else dict(adapter="lora", r=2)
        fa.patch(model, name=f"a{i}", **kind)
    assert len(list(patching._modules_to_wrappers(model))) == visited
    walks = []
    real = patching._modules_to_wrappers
    monkeypatch.setattr(patching, "_modules_to_wrappers", lambda *a, **k: walks.append(1) or real(*a, **k))
    fa.set_adapter(model, "a3")
    assert len(walks) == 2  # the wrappers' active adapter, and requires_grad for every adapter at once
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a3." in n or n.endswith(".a3") for n in trainable)


def test_get_config_is_a_copy_that_does_not_change_the_model():
    model = fa.patch(tiny_model("llama"), adapter="lora", r=2)
    cfg = fa.get_config(model)
    cfg.r = 64
    assert fa.get_config(model).r == 2


# ----------------------------------------------------------------------------- bad inputs
BAD_PATCHES = [
    (dict(adapter="ia3"), r"adapter: got 'ia3'; valid: lora, series, houlsby, pfeiffer, parallel, prefix"),
    (dict(adapter="lora", target_modules=["qq_proj"]), r"matched no module.*named: \[.*'q_proj'"),
    (dict(adapter="lora", r=0), r"LoRAConfig\.r: got 0; valid"),
    (dict(adapter="series", bottleneck_size=-2), r"bottleneck_size: got -2; valid"),
    (dict(adapter="series", non_linearity="elu"), r"non_linearity: got 'elu'; valid: tanh"),
    (dict(adapter="parallel", dropout=1.0), r"dropout: got 1\.0; valid"),
    (dict(adapter="prefix", num_virtual_tokens=0), r"num_virtual_tokens: got 0; valid"),
    (dict(adapter="lora", backend="gpu"), r"backend: got 'gpu'; valid: auto, torch, triton, cuda"),
    (dict(adapter="lora", target_modules=["q_proj", "input_layernorm"]),
     r"not linear layers.*input_layernorm.*valid targets are nn\.Linear or transformers Conv1D"),
    (dict(adapter="parallel", target_modules=["mlp"]), r"not linear layers.*LlamaMLP"),
    (dict(adapter="lora", rank=4), r"unknown field\(s\) \['rank'\]; valid"),
    (dict(adapter="lora", name="a.b"), r"name: got 'a\.b'; valid"),
    (dict(adapter="lora", name=""), r"name: got ''; valid"),
    (dict(config=fa.LoRAConfig(), adapter="lora"), r"either config"),
    (dict(config={"adapter_type": "lora"}), r"config: got dict; valid: LoRAConfig"),
    (dict(), r"adapter=\.\.\. \(lora, series, houlsby, pfeiffer, parallel, prefix\)"),
]


def _model_fingerprint(model):
    return (snapshot(model), module_types(model), grad_flags(model), dict(model.__dict__.get("_fastadapters").__dict__)
            if "_fastadapters" in model.__dict__ else None, "forward" in model.__dict__)


def _assert_unchanged(model, fp):
    sd, types, flags, st, fwd = fp
    assert_state_identical(sd, snapshot(model))
    assert module_types(model) == types
    assert grad_flags(model) == flags
    assert ("forward" in model.__dict__) == fwd
    if st is None:
        assert "_fastadapters" not in model.__dict__
    else:
        now = model.__dict__["_fastadapters"].__dict__
        assert now.keys() == st.keys() and all(now[k] == st[k] for k in st)


@pytest.mark.parametrize("kw,msg", BAD_PATCHES, ids=[str(i) for i in range(len(BAD_PATCHES))])
def test_bad_patch_raises_and_changes_nothing(kw, msg):
    model = tiny_model("llama")
    fp = _model_fingerprint(model)
    with pytest.raises(ValueError, match=msg):
        fa.patch(model, **kw)
    _assert_unchanged(model, fp)


def test_bad_second_adapter_changes_nothing():
    model = tiny_model("llama")
    fa.patch(model, adapter="lora", r=2)
    fa.patch(model, adapter="prefix", num_virtual_tokens=2, name="pre")
    fp = _model_fingerprint(model)
    bad = BAD_PATCHES[:-3] + [(dict(adapter="series"), r"already on this model"),  # duplicate name
                              (dict(adapter="prefix", name="pre"), r"'pre' is already on this model")]
    for kw, msg in bad:
        kw = dict(kw)
        kw.setdefault("name", "default")
        if kw["name"] == "default" and msg != r"already on this model":
            kw["name"] = "second"
        with pytest.raises(ValueError, match=msg):
            fa.patch(model, **kw)
        _assert_unchanged(model, fp)
    for fn in (lambda: fa.set_adapter(model, "nope"), lambda: fa.delete_adapter(model, "nope"),
               lambda: fa.get_config(model, "nope")):
        with pytest.raises(ValueError, match=r"no adapter named 'nope'; loaded: \['default', 'pre'\]"):
            fn()
        _assert_unchanged(model, fp)
    with pytest.raises(ValueError, match="backend"):
        fa.set_backend(model, "gpu")
    _assert_unchanged(model, fp)


def test_unpatched_model_operations_say_patch_first():
    model = tiny_model("llama")
    for fn in (fa.unpatch, lambda m: fa.set_adapter(m, "x"), lambda m: fa.delete_adapter(m, "x")):
        with pytest.raises(ValueError, match="patch"):
            fn(model)
    with pytest.raises(ValueError, match=r"model_type 'bert_like'.*pass target_modules.*known families"):
        model.config.model_type = "bert_like"
        fa.patch(model, adapter="lora")


def _deep_fingerprint(model):
    """State dict, module types, grad flags, the instance forward and a copy of the patch state."""
    st = model.__dict__.get("_fastadapters")
    copy = None if st is None else {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                                    for k, v in st.__dict__.items()}
    wrappers = {n: (m.active_adapter, m.backend, sorted(m.specs)) for n, m in model.named_modules()
                if isinstance(m, AdapterLinear)}
    return snapshot(model), module_types(model), grad_flags(model), model.__dict__.get("forward"), copy, wrappers


def _assert_same(model, fp):
    sd, types, flags, fwd, st, wrappers = fp
    now = _deep_fingerprint(model)
    assert_state_identical(sd, now[0])
    assert (now[1], now[2], now[3], now[4], now[5]) == (types, flags, fwd, st, wrappers)


def _failing_after(monkeypatch, cls, method, calls):
    """Make ``cls.method`` raise torch.OutOfMemoryError on its ``calls``-th call."""
    orig = getattr(cls, method)
    seen = [0]

    def flaky(self, *a, **k):
        seen[0] += 1
        if seen[0] == calls:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return orig(self, *a, **k)
    monkeypatch.setattr(cls, method, flaky)


_MID_PATCH = [(a, b, c) for a in ("series", "parallel") for b in (None, "lora", "prefix") for c in (1, 3, 5)] + \
    [("prefix", b, 1) for b in (None, "lora", "prefix")]  # one prefix encoder is built per patch call


@pytest.mark.parametrize("adapter,before,calls", _MID_PATCH)
def test_failure_in_the_middle_of_patch_is_rolled_back(monkeypatch, before, adapter, calls):
    """An error after validation (out of memory while making the k-th adapter) leaves the model as it was."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = input_ids()
    if before == "lora":
        fa.patch(model, adapter="lora", r=2, target_modules=["q_proj", "v_proj", "up_proj"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()
    elif before == "prefix":
        fa.patch(model, adapter="prefix", num_virtual_tokens=3, name="pre")
    with torch.no_grad():
        want = model(ids).logits
    fp = _deep_fingerprint(model)
    if adapter == "prefix":
        _failing_after(monkeypatch, PrefixEncoder, "__init__", calls)
        kw = dict(adapter="prefix", num_virtual_tokens=2, name="new")
    else:
        _failing_after(monkeypatch, AdapterLinear, "add_adapter", calls)
        kw = dict(adapter=adapter, bottleneck_size=4, name="new")
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        fa.patch(model, **kw)
    _assert_same(model, fp)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    if before is None:
        assert "_fastadapters" not in model.__dict__
        return
    fa.patch(model, **kw)  # the name is free again and the model still patches
    assert "new" in fa.adapter_names(model)
