"""Item 2 of issue 18: series adapters on vLLM through the plugin, beside LoRA and the base model.

Pfeiffer (output placement on the MLP down projection: y = h + s·U·act(D·h), h = W·x) and Houlsby
(input placement on gate/up, which vLLM merges into one gate_up layer, plus the output placement on
down), in our file format, served with a PEFT LoRA adapter on down_proj too (so one slot table holds
an output-placement branch and a plain one on the same layer) and base requests, all sent at once.
Each request's greedy tokens must equal ``fastadapters serve``'s engine. Tolerance as in
test_plugin_parallel: exact tokens in fp32 (Houlsby's input placement is computed as (W·s·U)·act(D·x)
instead of W·(s·U·act(D·x)): the same product in another order, ~1e-6 relative).
A prefix adapter loaded at run time is refused with the reason (vLLM's 500) and the server keeps serving.
"""
from __future__ import annotations

import concurrent.futures

import httpx
import torch

import fastadapters as fa

from .helpers import vllm_greedy, vllm_server
from .test_interop_lora import PROMPTS, fastadapters_greedy
from .test_plugin_parallel import _randomize

N_NEW = 12


def test_series_adapters_mixed_batch_same_greedy_tokens(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    fa.patch(model, "series", name="pfeiffer", variant="pfeiffer", bottleneck_size=16, non_linearity="relu",
             scaling=1.5)
    fa.patch(model, "series", name="houlsby", variant="houlsby", bottleneck_size=8, non_linearity="tanh")
    fa.patch(model, "lora", name="lora", r=8, alpha=16, target_modules=["down_proj", "q_proj"])
    fa.patch(model, "prefix", name="prefix", num_virtual_tokens=2)
    paths = {}
    for i, (name, std, fmt) in enumerate((("pfeiffer", 0.05, "fastadapters"), ("houlsby", 0.05, "fastadapters"),
                                          ("lora", 0.05, "peft"), ("prefix", 0.0, "fastadapters"))):
        _randomize(model, name, seed=30 + i, std=std)
        paths[name] = fa.save_adapter(model, str(tmp_path / name), name=name, format=fmt)
    del model
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    names = [None, "pfeiffer", "houlsby", "lora"]
    cases = [(p, a) for p in prompts for a in names]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = fastadapters_greedy(smollm2, {n: paths[n] for n in names[1:]}, [p for p, _ in cases],
                                   [a for _, a in cases])
    finally:
        torch.set_num_threads(threads)
    base = {tuple(p): o for (p, a), o in zip(cases, ours) if a is None}
    for a in names[1:]:
        assert any(o != base[tuple(p)] for (p, n), o in zip(cases, ours) if n == a), a
    mods = [f"{n}={paths[n]}" for n in names[1:]]
    with vllm_server(smollm2, ["--dtype", "float32", "--enable-lora", "--lora-modules", *mods,
                               "--max-lora-rank", "16", "--max-loras", "3", "--max-model-len", "256",
                               "--max-num-seqs", "16"],
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as url:
        r = httpx.post(f"{url}/v1/load_lora_adapter", timeout=300,
                       json={"lora_name": "prefix", "lora_path": paths["prefix"]})
        # vLLM answers a load that fails in its worker with 500 and a shortened message (its own choice,
        # the same for its own PEFT checks); the reason must be in it and the server must go on serving
        assert r.status_code in (400, 500) and "is prefix-tu" in r.text, (r.status_code, r.text)
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            theirs = list(pool.map(lambda c: vllm_greedy(url, c[1] or "smollm2", c[0], N_NEW), cases))
    bad = [(a, i, o, t) for i, ((p, a), o, t) in enumerate(zip(cases, ours, theirs)) if o != t]
    assert not bad, f"{len(bad)} of {len(cases)} requests differ (adapter, case, fastadapters, vLLM): {bad[:3]}"
