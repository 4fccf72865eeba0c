"""LoRA on sibling projections that read one input (q/k/v, gate/up) shares that read on the triton
backend (interpreter here): the grouped path runs where the patched model allows it, gives the
numbers of the one-projection-at-a-time path (same seeds, same dropout masks), and steps aside
whenever its assumptions do not hold."""
import pytest
import torch

import fastadapters as fa
from fastadapters.kernels import lora_group as KG
from tiny_models import input_ids, tiny_model

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def group_calls(monkeypatch):
    calls = []
    orig = KG.launch_down_proj_group

    def counting(x, a_pad, brg, G, p, seeds):
        calls.append(G)
        return orig(x, a_pad, brg, G, p, seeds)
    monkeypatch.setattr(KG, "launch_down_proj_group", counting)
    return calls


def _unlink(model):
    for m in model.modules():
        if isinstance(m, fa.layers.AdapterLinear):
            m.__dict__.pop("shared_input", None)


def _patched(backend="triton", targets=ALL_LLAMA, dropout=0.1, arch="llama", seed=2, **fields):
    """A tiny model with LoRA r=4 (or the adapter ``fields`` give) and nonzero up weights."""
    model = tiny_model(arch, seed=0)
    fields = fields or dict(adapter="lora", r=4, alpha=8, target_modules=targets)
    fa.patch(model, backend=backend, dropout=dropout, **fields)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n or "adapter_up" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _steps(model, steps=2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = input_ids(batch=2, length=9)
    torch.manual_seed(0)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in params]))
        opt.step()
    return out


def _assert_same_steps(grouped, ungrouped):
    for step, ((la, ga), (lb, gb)) in enumerate(zip(grouped, ungrouped)):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5, msg=lambda m: f"loss step {step}: {m}")
        for i, (a, b) in enumerate(zip(ga, gb)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {i} step {step}: {m}")


def test_llama_groups_qkv_and_gate_up(group_calls):
    model = _patched()
    ids = input_ids(batch=2, length=9)
    with torch.no_grad():
        model(ids)
    assert group_calls == [3, 2, 3, 2]  # per layer: q/k/v then gate/up; down_proj stands alone


def test_grouped_training_equals_ungrouped_with_dropout(group_calls):
    grouped = _steps(_patched())
    assert group_calls, "the grouped path did not run"
    ref_model = _patched()
    _unlink(ref_model)
    calls_before = len(group_calls)
    ungrouped = _steps(ref_model)
    assert len(group_calls) == calls_before
    _assert_same_steps(grouped, ungrouped)


def test_default_targets_group_q_and_v(group_calls):
    model = _patched(targets=None)  # LoRA's default targets on llama: q_proj, v_proj (k stays plain)
    with torch.no_grad():
        model(input_ids(batch=2, length=5))
    assert group_calls == [2, 2]


def test_steps_aside_when_its_assumptions_fail(group_calls):
    ids = input_ids(batch=2, length=6)
    model = _patched(dropout=0.0)
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    # a pre-hook that changes k_proj's input: k must see its own input, not the shared one
    attn = model.model.layers[0].self_attn
    handle = attn.k_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0,))
    group_calls.clear()
    with torch.no_grad():
        hooked = model(ids).logits
    handle.remove()
    assert group_calls == [3, 2, 3, 2]  # k runs alone; no second group for v, which takes its output
    assert not any(m.__dict__["shared_input"]._pending for m in model.modules() if "shared_input" in m.__dict__)
    ref = _patched(dropout=0.0)
    ref.eval()
    _unlink(ref)
    handle = ref.model.layers[0].self_attn.k_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0,))
    with torch.no_grad():
        torch.testing.assert_close(hooked, ref(ids).logits, atol=1e-5, rtol=1e-5)
    handle.remove()
    # an adapter that sits on q only is not grouped; switching back groups again
    fa.patch(model, adapter="lora", r=2, target_modules=["q_proj"], name="q_only")
    fa.set_adapter(model, "q_only")
    group_calls.clear()
    with torch.no_grad():
        model(ids)
    assert group_calls == []
    fa.set_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-6, rtol=1e-6)
    assert group_calls == [3, 2, 3, 2]


def test_torch_backend_and_links_follow_the_wrappers(group_calls):
    model = _patched(backend="torch")
    with torch.no_grad():
        model(input_ids(batch=2, length=5))
    assert group_calls == []  # nothing to share on the torch path
    q = model.model.layers[0].self_attn.q_proj
    share = q.__dict__["shared_input"]
    assert [m for m in share.members] == [q, model.model.layers[0].self_attn.k_proj,
                                          model.model.layers[0].self_attn.v_proj]
    fa.unpatch(model)
    assert not any("shared_input" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch,linked", [("opt", 3), ("gptj", 3), ("gpt2", 0), ("bloom", 0)])
def test_families_that_share_an_input(arch, linked):
    targets = {"opt": ["q_proj", "k_proj", "v_proj"], "gptj": ["q_proj", "k_proj", "v_proj"]}.get(arch)
    model = _patched(arch=arch, targets=targets)
    shares = {id(m.__dict__["shared_input"]): len(m.__dict__["shared_input"].members)
              for m in model.modules() if "shared_input" in m.__dict__}
    assert set(shares.values()) <= {linked} and (len(shares) == 2) == bool(linked)


def test_grouped_under_inference_mode(group_calls):
    """torch.inference_mode keeps no version counters: the grouped path still runs and agrees."""
    model = _patched(dropout=0.0)
    model.eval()
    ids = input_ids(batch=2, length=6)
    with torch.no_grad():
        want = model(ids).logits
    group_calls.clear()
    with torch.inference_mode():
        got = model(ids).logits
    assert group_calls == [3, 2, 3, 2]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_parallel_adapters_on_qkv_group_and_train_the_same(group_calls):
    """Parallel adapters (their default targets are q, k, v) with a learned scaling and dropout:
    grouped and ungrouped training give the same losses and gradients (scalings included)."""
    def patched():
        return _patched(seed=4, adapter="parallel", bottleneck_size=8, non_linearity="relu", scaling="learned")

    grouped = _steps(patched())
    assert group_calls and set(group_calls) == {3}
    ref = patched()
    _unlink(ref)
    n = len(group_calls)
    ungrouped = _steps(ref)
    assert len(group_calls) == n
    _assert_same_steps(grouped, ungrouped)


def test_switched_off_by_environment(group_calls, monkeypatch):
    model = _patched(dropout=0.0)
    ids = input_ids(batch=2, length=5)
    with torch.no_grad():
        want = model(ids).logits
    group_calls.clear()
    monkeypatch.setenv("FASTADAPTERS_SHARED_INPUT", "0")
    with torch.no_grad():
        got = model(ids).logits
    assert group_calls == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_model_with_waiting_outputs_deep_copies(group_calls):
    """Outputs waiting for their member (non-leaf tensors) are not copied: deepcopy works and the
    copy computes the same outputs."""
    import copy

    model = _patched(dropout=0.0)
    model.train()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, requires_grad=True)
    attn.q_proj(x)  # k and v now wait with graph-attached outputs
    assert attn.q_proj.__dict__["shared_input"]._pending
    twin = copy.deepcopy(model)
    assert not twin.model.layers[0].self_attn.q_proj.__dict__["shared_input"]._pending
    model.eval()
    twin.eval()
    ids = input_ids(batch=2, length=5)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- precision under autocast
# The grouped backward chains the members' dX in the input's dtype (bf16 under autocast: each member
# adds its term to the bf16 partial sum, G roundings of growing sums), while each projection on its
# own gives a bf16 dX that autograd adds in fp32. The DESIGN.md rule still holds for the grouped dX,
# against the plain torch formula run by autocast (each member's linear + adapter term; autograd adds
# their dX), max and mean error vs fp64.


def test_gpu_rounding_rounds_to_nearest():
    """The helper the precision tests run under: the kernels' fp32 -> bf16 stores round to nearest,
    as torch's cast does (the interpreter alone truncates)."""
    import triton
    import triton.language as tl
    from kernel_checks import gpu_rounding

    @triton.jit
    def store(x_ptr, y_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(y_ptr + r, tl.load(x_ptr + r))

    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    y = torch.empty(256, dtype=torch.bfloat16)
    with gpu_rounding():
        store[(1,)](x, y, 256)
    assert torch.equal(y, x.to(torch.bfloat16))


def _rule_model(adapter, seed, hidden, inter, backend):
    """A one-layer llama (tiny_models' family, odd sizes) with ``adapter`` on q/k/v and gate/up."""
    import transformers as T
    from tiny_models import VOCAB

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = T.LlamaForCausalLM(cfg).eval()
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    if adapter == "lora":
        fa.patch(model, adapter="lora", r=5, alpha=8, dropout=0.0, target_modules=targets, backend=backend)
    else:  # gelu: relu's kink turns a rounding of its input into an O(1) gradient difference
        fa.patch(model, adapter="parallel", bottleneck_size=7, non_linearity="gelu", scaling="learned",
                 dropout=0.0, target_modules=targets, backend=backend)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _plain(mod, x):
    """The member's output as plain torch (run by autocast when it is on)."""
    from fastadapters.ops.bottleneck import ACT_FNS

    name = mod.active_adapter
    spec = mod.specs[name]
    w, b = mod._base_args()
    s = mod.scaling_of(name)
    y = torch.nn.functional.linear(x, w, b)
    if spec.kind == "lora":
        return y + s * ((x @ mod.lora_A[name].weight.t()) @ mod.lora_B[name].weight.t())
    act = ACT_FNS[spec.config.non_linearity]
    return y + s * (act(x @ mod.adapter_down[name].weight.t()) @ mod.adapter_up[name].weight.t())


def _shared_dx(model, names, x, dys, autocast, plain=False):
    """dX of the members ``names`` of layer 0 called in turn on x (as the model calls them)."""
    layer = model.model.layers[0]
    mods = [getattr(layer.self_attn, n, None) or getattr(layer.mlp, n) for n in names]
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ys = [_plain(m, x) if plain else m(x) for m in mods]
    torch.autograd.backward(ys, [dy.to(y.dtype) for y, dy in zip(ys, dys)])
    return x.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("adapter", ["lora", "parallel"])
def test_shared_input_grad_under_bf16_autocast_within_rule(adapter, backend, group_calls, monkeypatch):
    """dX of q/k/v (3 members) and gate/up (2) under CPU bf16 autocast, grouped where the backend
    groups (triton) and each member alone (FASTADAPTERS_SHARED_INPUT=0): max and mean error vs fp64
    at most 2x the plain torch formula's under autocast, for odd sizes and several seeds. Triton
    runs under ``gpu_rounding`` (the GPU's bf16 rounding)."""
    import copy

    from kernel_checks import gpu_rounding

    for hidden, inter, M in ((44, 37, 13), (36, 50, 21)):
        for seed in range(3):
            model = _rule_model(adapter, seed, hidden, inter, backend)
            m64 = copy.deepcopy(model).double()
            fa.set_backend(m64, "torch")
            for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                g = torch.Generator().manual_seed(seed + 7)
                x = torch.randn(M, hidden, generator=g)
                widths = [getattr(model.model.layers[0].self_attn, n, None) or getattr(model.model.layers[0].mlp, n)
                          for n in names]
                # upstream gradients exactly representable in bf16: every path sees the same dY
                dys = [torch.randn(M, m.out_features, generator=g).to(torch.bfloat16).double() for m in widths]
                want = _shared_dx(m64, names, x.double(), dys, autocast=False)
                ref_t = _shared_dx(model, names, x, dys, autocast=True, plain=True)
                got = {}
                for shared in ("1", "0"):
                    monkeypatch.setenv("FASTADAPTERS_SHARED_INPUT", shared)
                    group_calls.clear()
                    with gpu_rounding():
                        got[shared] = _shared_dx(model, names, x, dys, autocast=True)
                    grouped = backend == "triton" and shared == "1"
                    assert group_calls == ([len(names)] if grouped else []), (backend, shared, group_calls)
                e = lambda t: (t.double() - want).abs()  # noqa: E731
                where = f"{adapter} {backend} {names} K={hidden} M={M} seed={seed}"
                for stat in ("max", "mean"):
                    err_t = getattr(e(ref_t), stat)().item()
                    for shared, dx in got.items():
                        assert dx.dtype == torch.float32
                        err = getattr(e(dx), stat)().item()
                        assert err <= 2 * err_t, (
                            f"{where} shared={shared}: {stat} |dX - fp64| {err:.3g} > 2 x plain autocast's "
                            f"{err_t:.3g} (ungrouped {getattr(e(got['0']), stat)().item():.3g})")
