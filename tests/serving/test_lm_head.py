"""The engine's oneDNN-packed LM head on the CPU (``serving/lm_head.py``): same logits as
``F.linear`` (fp64 reference), repacked when the weight changes, never used where it does not
apply, and a warned fallback (not a silent one) when the private ops are missing."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastadapters.serving import lm_head as lm
from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import greedy_ref, prompts, tiny_engine


class _Model(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.head = layer

    def get_output_embeddings(self):
        return self.head


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_packed_head_matches_the_fp64_reference_within_twice_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = nn.Linear(67, 1001, bias=bias)  # odd sizes
    head = lm.lm_head(_Model(layer), torch.device("cpu"))
    assert isinstance(head, lm.PackedLMHead)
    x = torch.randn(rows, 67)
    ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.no_grad():
        plain_err = (F.linear(x, layer.weight, layer.bias).double() - ref).abs().max()
        packed_err = (head(x).double() - ref).abs().max()
    assert packed_err <= 2 * plain_err + 1e-6


@needs_onednn
def test_a_weight_changed_in_place_is_repacked_before_use():
    layer = nn.Linear(16, 40, bias=False)
    head = lm.lm_head(_Model(layer), torch.device("cpu"))
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
        assert torch.allclose(head(x), F.linear(x, layer.weight), atol=1e-5)
        layer.weight = nn.Parameter(torch.randn(40, 16))  # replaced, not edited
        assert torch.allclose(head(x), F.linear(x, layer.weight), atol=1e-5)


def test_not_used_off_the_cpu_path_or_for_other_layers():
    class Wrapped(nn.Module):  # e.g. an adapter wrapping the output layer
        weight = nn.Parameter(torch.zeros(2, 2))

    lin = nn.Linear(4, 8)
    assert lm.lm_head(_Model(lin), torch.device("meta")) is lin
    assert lm.lm_head(_Model(lin.half()), torch.device("cpu")) is lin
    assert lm.lm_head(_Model(lin), torch.device("cpu"), pack=False) is lin  # the engine decided against packing
    w = Wrapped()
    assert lm.lm_head(_Model(w), torch.device("cpu")) is w


def test_bfloat16_head_packed_errs_at_most_twice_f_linear():
    torch.manual_seed(3)
    layer = nn.Linear(333, 1001).bfloat16()  # odd sizes
    head = lm.lm_head(_Model(layer), torch.device("cpu"))
    assert isinstance(head, lm.PackedLMHead)
    for rows in (1, 7, 40):
        x = torch.randn(rows, 333).bfloat16()
        ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        with torch.no_grad():
            got, plain = head(x), F.linear(x, layer.weight, layer.bias)
        assert got.dtype == torch.bfloat16
        assert (got.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max()


def test_missing_private_ops_fall_back_with_one_warning(monkeypatch):
    def gone(*a, **k):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")

    monkeypatch.setattr(lm.PackedLMHead, "_pack", gone)
    monkeypatch.setattr(lm, "_WARNED", set())
    lin = nn.Linear(4, 8)
    with pytest.warns(RuntimeWarning, match=re.escape(f"packed LM head is unavailable on torch {torch.__version__}")):
        assert lm.lm_head(_Model(lin), torch.device("cpu")) is lin
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lm.lm_head(_Model(lin), torch.device("cpu")) is lin  # once


@needs_onednn
def test_engine_uses_it_and_keeps_greedy_tokens():
    engine = tiny_engine(max_num_seqs=4)
    assert isinstance(engine._lm_head, lm.PackedLMHead)
    ps = prompts([5, 9, 3], seed=11)
    sp = SamplingParams(max_tokens=6, temperature=0)
    reqs = engine.generate(ps, sp)
    for p, r in zip(ps, reqs):
        assert r.output_ids == greedy_ref(engine, None, p, sp.max_tokens)
