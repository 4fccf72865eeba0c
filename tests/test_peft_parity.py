"""LoRA parity with PEFT itself: same weights in, same logits and same LoRA gradients out.

Both models start from the same tiny base (same seed); fastadapters patches with the
architecture's default LoRA targets (fastadapters.models), PEFT gets a ``LoraConfig`` on the same
targets (gpt2's Conv1D needs ``fan_in_fan_out=True``). Random A and nonzero B are copied from ours
into PEFT's ``lora_A.default`` / ``lora_B.default``. Dropout draws differ between the two
libraries, so dropout is compared in eval mode for values and in train mode for statistics.
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa
from tiny_models import input_ids, tiny_model
from fastadapters import models

peft = pytest.importorskip("peft")

PARITY_ARCHS = ("llama", "opt", "bloom", "gptj", "gpt2")


def peft_lora(arch, targets, r, alpha, dropout=0.0, use_rslora=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                          use_rslora=use_rslora, fan_in_fan_out=(arch == "gpt2"), bias="none")
    return peft.get_peft_model(tiny_model(arch), cfg)


def ours_lora(arch, r, alpha, dropout=0.0, use_rslora=False, seed=3):
    model = tiny_model(arch)
    fa.patch(model, adapter="lora", r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:  # random A, nonzero B
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def lora_pairs(ours, theirs):
    """[(our name, our param, PEFT's param)] for every LoRA weight; both sides must match 1:1."""
    pt = dict(theirs.named_parameters())
    pairs = []
    for n, p in ours.named_parameters():
        if ".lora_" in n:
            pairs.append((n, p, pt[f"base_model.model.{n}"]))
    assert pairs and len(pairs) == sum(".lora_" in n for n in pt)
    return pairs


def copy_lora(ours, theirs):
    with torch.no_grad():
        for _, p, q in lora_pairs(ours, theirs):
            q.copy_(p)


@pytest.mark.parametrize("arch", PARITY_ARCHS)
@pytest.mark.parametrize("r,alpha,rslora", [(4, 8, False), (5, 3, True)])
def test_logits_and_gradients_match_peft(arch, r, alpha, rslora):
    targets = models.default_targets(tiny_model(arch), "lora")
    ours = ours_lora(arch, r, alpha, use_rslora=rslora)
    theirs = peft_lora(arch, targets, r, alpha, use_rslora=rslora)
    copy_lora(ours, theirs)
    # same modules adapted
    ours_paths = {n.rsplit(".lora_", 1)[0] for n, _ in ours.named_parameters() if ".lora_" in n}
    peft_paths = {n[len("base_model.model."):].rsplit(".lora_", 1)[0]
                  for n, _ in theirs.named_parameters() if ".lora_" in n}
    assert ours_paths == peft_paths

    ids = input_ids(2, 9)
    out_o = ours(input_ids=ids, labels=ids)
    out_t = theirs(input_ids=ids, labels=ids)
    base_logits = tiny_model(arch)(input_ids=ids).logits
    assert not torch.allclose(out_o.logits, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=1e-5, atol=1e-5)
    out_o.loss.backward()
    out_t.loss.backward()
    for n, p, q in lora_pairs(ours, theirs):
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)

    # same trainable parameter counts as PEFT reports
    assert tuple(fa.trainable_parameters(ours)) == tuple(theirs.get_nb_trainable_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dropout_eval_mode_matches_peft(arch):
    targets = models.default_targets(tiny_model(arch), "lora")
    ours = ours_lora(arch, 4, 8, dropout=0.3)
    theirs = peft_lora(arch, targets, 4, 8, dropout=0.3)
    copy_lora(ours, theirs)
    ours.eval()
    theirs.eval()
    ids = input_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _branch_kept_fraction(model, module_path, p):
    """Train-mode forward with A = B = I (r = d, alpha = r, base output subtracted): the LoRA branch
    is dropout(x) itself; returns (kept fraction, kept values / x)."""
    mod = model.get_submodule(module_path)
    seen = {}

    def hook(m, args, out):
        seen["x"], seen["y"] = args[0].detach(), out.detach()

    h = mod.register_forward_hook(hook)
    model.train()
    with torch.no_grad():
        model(input_ids=input_ids(8, 32, seed=4))
    h.remove()
    base = mod.base_layer
    x = seen["x"]
    branch = seen["y"] - base(x)
    kept = branch.abs() > 1e-6 * x.abs().max()
    ratio = (branch[kept] / x[kept])
    return kept.double().mean().item(), ratio


def test_train_mode_dropout_statistics_match_peft():
    p, d = 0.25, 32
    path = "model.layers.0.self_attn.q_proj"  # 32 -> 32 in the tiny llama
    ours = tiny_model("llama")
    fa.patch(ours, adapter="lora", r=d, alpha=d, dropout=p, target_modules=["q_proj"])
    theirs = peft_lora("llama", ["q_proj"], d, d, dropout=p)
    with torch.no_grad():
        for n, w in list(ours.named_parameters()) + list(theirs.named_parameters()):
            if ".lora_" in n:
                w.copy_(torch.eye(d))
    torch.manual_seed(0)
    f_o, ratio_o = _branch_kept_fraction(ours, path, p)
    f_t, ratio_t = _branch_kept_fraction(theirs.base_model.model, path, p)
    n = 8 * 32 * d
    tol = 5 * (p * (1 - p) / n) ** 0.5
    assert abs(f_o - (1 - p)) < tol and abs(f_t - (1 - p)) < tol, (f_o, f_t)
    torch.testing.assert_close(ratio_o, torch.full_like(ratio_o, 1 / (1 - p)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ratio_t, torch.full_like(ratio_t, 1 / (1 - p)), rtol=1e-4, atol=1e-4)
