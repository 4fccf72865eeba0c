"""Patched layers run under bf16 autocast (what Trainer's --bf16 with an fp32 model does) and
stay close to the same computation in fp32; adapter weights keep fp32 gradients."""
import pytest
import torch

import fastadapters as fa
from transformers import LlamaConfig, LlamaForCausalLM

CASES = [
    ("lora", dict(r=4, alpha=8, dropout=0.1)),
    ("series", dict(variant="houlsby", bottleneck_size=3, init="zero_up")),
    ("series", dict(variant="pfeiffer", bottleneck_size=3, scaling="learned")),
    ("parallel", dict(bottleneck_size=3, dropout=0.1)),
]


@pytest.mark.parametrize("adapter,fields", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_autocast_bf16_forward_backward(adapter, fields):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    fa.patch(model, adapter=adapter, **fields)
    for n, p in model.named_parameters():  # make every adapter weight matter
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(0, 64, (2, 9))
    ref = model(input_ids=ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype in (torch.bfloat16, torch.float32)
    assert torch.allclose(out.logits.float(), ref, atol=0.1, rtol=0.05)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_bottleneck_branch_stays_fp32_under_autocast():
    """Issue 2: f(z) is computed in fp32 and cast back, also when autocast would run it in bf16."""
    from fastadapters.ops.bottleneck import bottleneck_linear

    torch.manual_seed(0)
    x = torch.randn(8, 32)
    W, D, U = torch.randn(32, 32) / 6, torch.randn(4, 32) / 6, torch.randn(32, 4) / 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ W.t()  # the base output as autocast makes it (bf16)
        y = bottleneck_linear("output", x, (W, None), D, U, 1.0, "tanh")
    expected = h + (torch.tanh(h.float() @ D.t()) @ U.t()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
