"""Prefix-tuning files in PEFT's format, both ways, checked against PEFT itself.

PEFT keeps one tensor ``prompt_embeddings`` (P, layers*2*kv_heads*head_dim): the prefixes after any
projection MLP. A PEFT file loaded here must give PEFT's logits and greedy tokens (with a padded
attention mask), and a file we write must load in ``peft.PeftModel.from_pretrained`` and give our
logits. Files made for another attention geometry are refused and leave the model as it was.
"""
from __future__ import annotations

import json

import pytest
import torch

import fastadapters as fa
from tiny_models import ARCHS, assert_state_identical, input_ids, snapshot, tiny_model

peft = pytest.importorskip("peft")


def _batch():
    ids = input_ids(batch=2, length=6, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding on the second row
    return ids, mask


def _logits(model):
    ids, mask = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, -1]


def _greedy(model):
    ids, mask = _batch()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    return out[:, ids.shape[1]:]


def _greedy_rows_alone(model, steps=4):
    """Each row of ``_batch`` without its padding, decoded greedily by full forwards without a cache.

    The reference for ``_greedy``: PEFT's own ``generate`` cannot serve as one, since on transformers
    5.24 (peft 0.21.2) it passes the prefix as ``past_key_values`` beside generate's ``cache`` and the
    prefix is dropped; PEFT's forward still applies it.
    """
    ids, mask = _batch()
    rows = []
    for row, keep in zip(ids, mask.bool()):
        seq = row[keep][None]
        for _ in range(steps):
            with torch.no_grad():
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        rows.append(seq[0, -steps:])
    return torch.stack(rows)


def _peft_prefix_model(arch, projection):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                  encoder_hidden_size=8)
    torch.manual_seed(11)
    theirs = peft.get_peft_model(tiny_model(arch), cfg)
    if projection:  # PEFT zero-initialises nothing here, but make the MLP's output clearly nonzero
        with torch.no_grad():
            for p in theirs.prompt_encoder["default"].transform.parameters():
                p.normal_(0.0, 0.5)
    return theirs.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_prefix_file_loads_with_peft_outputs(arch, tmp_path):
    theirs = _peft_prefix_model(arch, projection=False)
    theirs.save_pretrained(str(tmp_path))
    ours = fa.load_adapter(tiny_model(arch), tmp_path)
    cfg = fa.get_config(ours)
    assert isinstance(cfg, fa.PrefixConfig) and cfg.num_virtual_tokens == 3 and not cfg.prefix_projection
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    assert torch.equal(_greedy(ours), _greedy_rows_alone(theirs))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_projected_peft_prefix_loads_as_its_prefixes(arch, tmp_path):
    """PEFT saves a prefix_projection adapter's MLP output; it loads as a plain prefix with those values."""
    theirs = _peft_prefix_model(arch, projection=True)
    want = _logits(theirs)
    theirs.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_projection"] is True
    ours = fa.load_adapter(tiny_model(arch), tmp_path)
    assert fa.get_config(ours).prefix_projection is False
    torch.testing.assert_close(_logits(ours), want, rtol=1e-5, atol=1e-5)


def _randomised_prefix(arch, projection):
    model = fa.patch(tiny_model(arch), adapter="prefix", num_virtual_tokens=4, prefix_projection=projection,
                     encoder_hidden_size=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "prefix_encoder" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("arch,projection", [(a, False) for a in ARCHS] + [("llama", True), ("opt", True)])
def test_our_prefix_exports_to_peft(arch, projection, tmp_path):
    ours = _randomised_prefix(arch, projection)
    fa.save_adapter(ours, tmp_path, format="peft")
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == "PREFIX_TUNING" and d["num_virtual_tokens"] == 4
    assert d["prefix_projection"] is projection
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=1e-5, atol=1e-5)
    assert torch.equal(_greedy(ours), _greedy_rows_alone(theirs))
    back = fa.load_adapter(tiny_model(arch), tmp_path)  # and our own reader gives the same model back
    torch.testing.assert_close(_logits(back), _logits(ours), rtol=1e-5, atol=1e-5)


def test_prefix_file_for_another_geometry_is_refused(tmp_path):
    _peft_prefix_model("gpt2", projection=False).save_pretrained(str(tmp_path))  # 4 heads x 8, 2 layers
    model = tiny_model("llama")  # 2 kv heads x 8: same layers, other token_dim
    fa.patch(model, adapter="lora", r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"another attention geometry: num_attention_heads=4 \(this model: 2\), "
                                         r"token_dim=32 \(this model: 16\)"):
        fa.load_adapter(model, tmp_path, name="pre")
    assert fa.adapter_names(model) == ["default"]
    assert_state_identical(before, snapshot(model))


@pytest.mark.parametrize("edit,msg", [
    ({"num_transformer_submodules": 2}, r"num_transformer_submodules=2 is not supported"),
    ({"task_type": "SEQ_2_SEQ_LM"}, r"task_type='SEQ_2_SEQ_LM' is not supported"),
    ({"num_virtual_tokens": 0}, r"num_virtual_tokens"),
    ({"num_layers": 3}, r"num_layers=3 \(this model: 2\)"),
])
def test_bad_peft_prefix_config_is_refused(tmp_path, edit, msg):
    _peft_prefix_model("llama", projection=False).save_pretrained(str(tmp_path))
    cfg_file = tmp_path / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **edit}))
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=msg):
        fa.load_adapter(model, tmp_path)
    assert "_fastadapters" not in model.__dict__
    assert_state_identical(before, snapshot(model))
