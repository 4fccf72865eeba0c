"""Shared pieces of the `fastadapters serve` tests: an adapter zoo on disk, engines, references.

``save_zoo(dir)`` writes one adapter of every type (LoRA rank 4, LoRA rank 64 on q/v/o + MLP,
series Houlsby, series Pfeiffer, parallel, prefix) for the tiny llama of ``helpers.tiny_llama``,
all with random non-zero weights; ``tiny_engine(dir)`` builds an engine over a fresh tiny llama
with the zoo loaded. References: ``generate_ref`` (``model.generate(do_sample=False)`` with the
adapter set active) and, for prefix adapters, ``prefix_ref`` -- a plain greedy loop over
transformers' ``DynamicCache`` started with the prefix encoder's keys/values (the same
semantics as ``patching._prefix_forward``, written independently of the engine's packed path).

Fixtures for the engine and server tests, which import them by name (so they apply only to those
modules, each with its own module-scoped zoo): ``one_thread`` (autouse) and ``zoo`` (``save_zoo``
under a temporary directory).
"""
from __future__ import annotations

import os

import pytest
import torch

import fastadapters as fa
from .helpers import add_zoo, tiny_llama

ZOO_NAMES = ["lora_r4", "lora_r64", "houlsby", "pfeiffer", "parallel", "prefix"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: one intra-op thread is ~1000x steadier (OpenMP spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Adapter name -> saved directory (``save_zoo``), written once per test module."""
    return save_zoo(str(tmp_path_factory.mktemp("zoo")))


def save_zoo(root: str) -> dict[str, str]:
    """Adapter name -> directory, one adapter of each type, written under ``root``."""
    model = tiny_llama()
    add_zoo(model, ["lora_r4", "lora_r64", "houlsby", "pfeiffer", "parallel"])
    fa.patch(model, "prefix", name="prefix", num_virtual_tokens=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.fastadapters_prefix["prefix"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    paths = {}
    for name in ZOO_NAMES:
        paths[name] = fa.save_adapter(model, os.path.join(root, name), name=name)
    return paths


def tiny_engine(paths: dict[str, str] | None = None, **kw):
    from fastadapters.serving.engine import Engine

    kw.setdefault("backend", "torch")
    engine = Engine(tiny_llama(), **kw)
    for name, path in (paths or {}).items():
        engine.load_adapter(name, path, confined=False)
    return engine


def prompts(lengths, seed: int = 0, vocab: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def prefix_ref(model, encoder, ids: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(encoder(1, model.get_input_embeddings().weight.dtype)):
        cache.update(k, v, layer)
    x, out = torch.tensor([ids]), []
    for _ in range(n):
        past = cache.get_seq_length()
        o = model(input_ids=x, position_ids=torch.arange(past, past + x.shape[1])[None], use_cache=True,
                  attention_mask=torch.ones(1, past + x.shape[1], dtype=torch.long), past_key_values=cache)
        out.append(int(o.logits[0, -1].argmax()))
        if out[-1] in eos:
            break
        x = torch.tensor([[out[-1]]])
    return out


@torch.no_grad()
def greedy_ref(engine, adapter: str | None, ids: list[int], n: int, stop_at_eos: bool = False) -> list[int]:
    """What a request's greedy tokens must be: the model alone with that adapter active
    (``stop_at_eos``: ends at the model's EOS as the engine does; else exactly ``n`` tokens)."""
    model = engine.model
    entry = None if adapter is None else engine.registry.entries[adapter]
    if entry is not None and entry.prefix_kv is not None:
        fa.set_adapter(model, None)
        return prefix_ref(model, model.fastadapters_prefix[entry.internal], ids, n,
                          engine.eos_ids if stop_at_eos else frozenset())
    if fa.adapter_names(model):
        fa.set_adapter(model, None if entry is None else entry.internal)
    kw = {} if stop_at_eos else {"min_new_tokens": n}
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


def assert_no_leaks(engine) -> None:
    snap = engine.snapshot()
    assert snap["used_blocks"] == 0 and snap["running"] == 0 and snap["waiting"] == 0, snap
    assert snap["live_requests"] == 0, snap
    assert engine.pool.free_blocks == engine.pool.num_blocks


def install_fake_flashinfer(monkeypatch, wrapper_cls, version: str = "0.6.18"):
    """Put a fake ``flashinfer`` module (``BatchPrefillWithPagedKVCacheWrapper = wrapper_cls``, an
    ``events`` list the fake appends to) in ``sys.modules`` and let the engine's FlashInfer path run
    on the CPU with a tiny workspace; returns the module."""
    import sys
    import types

    from fastadapters.serving import cuda_graphs, flashinfer_attention as fia

    mod = types.ModuleType("flashinfer")
    mod.__version__ = version
    mod.events = []
    mod.BatchPrefillWithPagedKVCacheWrapper = wrapper_cls
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    monkeypatch.setattr(fia, "_ALLOW_CPU", True)
    monkeypatch.setattr(fia, "WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(fia, "_warned", set())
    monkeypatch.setattr(cuda_graphs, "_warned", set())
    return mod
