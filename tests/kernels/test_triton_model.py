"""A tiny patched Llama trains with backend="triton" (the interpreter) exactly as with "torch".

Three optimiser steps per adapter type (LoRA, series Houlsby with a learned scaling, parallel):
same losses, same adapter gradients at every step. Dropout is 0 here: the torch path draws its
masks from torch's RNG and the kernels from Philox, so only p = 0 is comparable step for step
(the kernels' dropout is checked against its own mask in test_lora / test_bottleneck).
Then torch.compile(fullgraph=True) of the patched model's forward and backward (aot_eager: the
custom ops' fakes and autograd, no inductor) runs without a graph break and gives the same loss.
"""
import pytest
import torch

import fastadapters as fa
from tiny_models import input_ids, tiny_model

ADAPTERS = {
    "lora": dict(adapter="lora", r=4, alpha=8, dropout=0.0),
    "series": dict(adapter="series", variant="houlsby", bottleneck_size=3, non_linearity="tanh",
                   scaling="learned", dropout=0.0),
    "parallel": dict(adapter="parallel", bottleneck_size=5, non_linearity="relu", dropout=0.0),
}


def _train(backend, fields, steps=3):
    model = tiny_model("llama", seed=0)
    fa.patch(model, backend=backend, **fields)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "patching left nothing trainable"
    with torch.no_grad():  # adapters start at zero-ish branches; perturb so every gradient flows
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    opt = torch.optim.SGD(params, lr=0.1)
    ids = input_ids(batch=2, length=9)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.detach().clone() for p in params])
        opt.step()
    return losses, grads


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_tiny_llama_trains_same_with_triton(kind):
    lt, gt = _train("torch", ADAPTERS[kind])
    lk, gk = _train("triton", ADAPTERS[kind])
    for step, (a, b) in enumerate(zip(lt, lk)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{kind} loss step {step}: {m}")
    for step, (ga, gb) in enumerate(zip(gt, gk)):
        for i, (a, b) in enumerate(zip(ga, gb)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m: f"{kind} grad {i} step {step}: {m}")


@pytest.mark.parametrize("fields", [dict(adapter="lora", r=4, alpha=8, dropout=0.1),
                                    dict(adapter="series", bottleneck_size=4, scaling="learned", dropout=0.1),
                                    dict(adapter="parallel", bottleneck_size=4, dropout=0.1)],
                         ids=["lora", "series", "parallel"])
def test_patched_model_compiles_fullgraph_with_triton_ops(fields):
    model = tiny_model("llama", seed=0)
    fa.patch(model, backend="triton", **fields)
    model.train()
    ids = input_ids(batch=2, length=9)

    def step(ids):
        return model(input_ids=ids, labels=ids).loss

    # fullgraph forward; its backward is the AOT-autograd graph built from the ops' autograd
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    loss_c = compiled(ids)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.manual_seed(0)
    loss_e = step(ids)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, p in zip(grads_c, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, p.grad)
