"""Adapter changes on a sharded / DDP-wrapped model: refused with nothing changed, except setting the
adapter that is already active. One process, a single-rank gloo group on the CPU (no torchrun)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fastadapters as fa
from fastadapters import distributed as fad
from tiny_models import VOCAB, tiny_model


@pytest.fixture
def one_rank_group(tmp_path):
    assert not dist.is_initialized(), "an earlier test left a process group initialised in this process"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _two_lora_model():
    model = tiny_model("llama", seed=0)
    fa.patch(model, adapter="lora", r=2, name="a")
    fa.patch(model, adapter="lora", r=3, name="b")  # beside "a", inactive
    return model


def _snapshot(model, inner=None):
    inner = model if inner is None else inner
    st = inner.__dict__["_fastadapters"]
    params = {n: (p.requires_grad, fad.full_tensor(p.detach()).clone()) for n, p in model.named_parameters()}
    return st.active, fa.adapter_names(inner), list(st.wrapped), params, type(inner.forward)


def _assert_same(before, after):
    assert before[:3] == after[:3] and before[4] == after[4]
    assert before[3].keys() == after[3].keys()
    for n, (grad, value) in before[3].items():
        assert after[3][n][0] == grad, n
        torch.testing.assert_close(after[3][n][1], value, atol=0, rtol=0, msg=n)


CHANGES = [
    ("set_adapter(model, 'b')", lambda m: fa.set_adapter(m, "b")),
    ("set_adapter(model, None)", lambda m: fa.set_adapter(m, None)),
    ("delete_adapter(model, 'b')", lambda m: fa.delete_adapter(m, "b")),
    ("delete_adapter(model, 'a')", lambda m: fa.delete_adapter(m, "a")),
    ("unpatch(model)", fa.unpatch),
    ("merge(model)", lambda m: fa.merge(m, "a")),
]


def test_fsdp2_refuses_adapter_changes_and_changes_nothing(one_rank_group):
    model = _two_lora_model()
    from torch.distributed.device_mesh import init_device_mesh

    fad.shard_model(model, mesh=init_device_mesh("cpu", (1,)))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # FSDP2's lazy init has run: its state is fixed now
    model.zero_grad(set_to_none=True)
    before = _snapshot(model)
    for call, change in CHANGES:
        with pytest.raises(ValueError) as err:
            change(model)
        msg = str(err.value)
        assert call in msg and "FSDP2 (fully_shard)" in msg and "nothing was changed" in msg, msg
        assert "shard_model" in msg and "plain model first" in msg, msg
        _assert_same(before, _snapshot(model))

    fa.set_adapter(model, "a")  # the adapter already active: allowed, and still only "a" trains
    _assert_same(before, _snapshot(model))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".a" in n for n in grads), grads
    assert any("lora_A.a" in n for n in grads) and any("lora_B.a" in n for n in grads)


def test_ddp_wrapper_refuses_adapter_changes_and_changes_nothing(one_rank_group):
    model = _two_lora_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    before = _snapshot(ddp, model)
    for call, change in CHANGES:
        with pytest.raises(ValueError) as err:
            change(ddp)
        msg = str(err.value)
        assert call in msg and "DistributedDataParallel" in msg and "nothing was changed" in msg, msg
        _assert_same(before, _snapshot(ddp, model))


def test_unwrapped_model_still_switches_deletes_and_unpatches():
    """The guard costs a plain model nothing: the same calls work as before."""
    model = _two_lora_model()
    fa.set_adapter(model, "b")
    assert [n for n, p in model.named_parameters() if p.requires_grad] and all(
        ".b" in n for n, p in model.named_parameters() if p.requires_grad)
    fa.delete_adapter(model, "a")
    assert fa.adapter_names(model) == ["b"]
    fa.unpatch(model)
    assert fa.adapter_names(model) == []
    assert fad.sharding_of(model) is None
