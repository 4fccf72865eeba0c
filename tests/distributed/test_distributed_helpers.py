"""fastadapters.distributed helpers that need no process group (one process, tiny models)."""
from __future__ import annotations

import torch

import fastadapters as fa
from fastadapters import distributed as fad
from tiny_models import tiny_model


def test_decoder_layers_and_unsharded_model():
    model = tiny_model("llama")
    layers = fad.decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    assert layers == list(model.model.layers)
    assert fad.sharding_of(model) is None
    assert fad.rank_and_world() == (0, 1)
    calls = []
    fad.write_on_rank0(lambda: calls.append(1), every_rank=True)  # no process group: this process writes
    assert calls == [1]


def test_scalar_parameters_become_vectors_with_same_outputs_and_files(tmp_path):
    """fully_shard refuses 0-d parameters: a learned scaling becomes a 1-element vector, which
    changes no output, trains, and is saved as the scalar an unsharded model saves."""
    model = tiny_model("llama")
    fa.patch(model, adapter="series", variant="houlsby", bottleneck_size=5, scaling="learned")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("adapter_scaling.default"):
                p.fill_(1.7)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fa.save_adapter(model, tmp_path / "scalar")
    fad.prepare_for_fully_shard(model)
    scalings = [p for n, p in model.named_parameters() if "adapter_scaling" in n]
    assert scalings and all(p.shape == (1,) and p.requires_grad for p in scalings)
    assert all(p.dim() > 0 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=0, rtol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.shape == (1,) for p in scalings)
    fa.save_adapter(model, tmp_path / "vector")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "scalar" / "adapter_model.safetensors")
    b = load_file(tmp_path / "vector" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    # and a file loads back into the converted model (a resume)
    with torch.no_grad():
        for p in scalings:
            p.zero_()
    fa.load_adapter(model, tmp_path / "scalar")
    assert all(p.shape == (1,) and torch.allclose(p, torch.tensor([1.7])) for p in scalings)


def test_patch_refusal_is_checked_before_any_change():
    """A DDP-wrapped model is refused (checked without a process group by a stand-in of its class)."""
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model("llama")
    fake = DistributedDataParallel.__new__(DistributedDataParallel)
    torch.nn.Module.__init__(fake)
    fake.module = model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fa.patch(fake, adapter="lora", r=2)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("patch accepted a DistributedDataParallel model")
    assert "DistributedDataParallel" in msg and "patch must come first" in msg
    assert "_fastadapters" not in model.__dict__ and "_fastadapters" not in fake.__dict__
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
