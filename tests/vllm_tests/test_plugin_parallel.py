"""Items 1 and 3 of issue 18: the plugin serves parallel adapters in the same batch as LoRA adapters.

On SmolLM2-135M-Instruct: two parallel adapters in our own file format, as ``fa.save_adapter`` writes
them (tanh on q/k/v with scaling 2.0; gelu on q/v/o/gate/up/down with a learned scaling, so the
row-parallel o/down layers and the merged qkv and gate/up layers all carry one), and one LoRA adapter
in PEFT's format. vLLM starts with the plugin (its entry point) and ``--lora-modules``; a fourth adapter
(the tanh one under another name) comes through ``/v1/load_lora_adapter``. All requests are sent at
once so that vLLM batches base, LoRA and parallel rows together; each request's greedy tokens must equal
``fastadapters serve``'s engine on the same prompt ids.

Tolerance: exact tokens. vLLM computes the branch's shrink into an fp32 buffer and applies the
activation there (as our fp32 branch does); with the model in fp32 the two sides differ by summation
order only (~1e-6 relative on logits), far below the top-two logit gaps of these greedy steps.
"""
from __future__ import annotations

import concurrent.futures

import httpx
import torch

import fastadapters as fa

from .helpers import vllm_greedy, vllm_server
from .test_interop_lora import PROMPTS, fastadapters_greedy

N_NEW = 12


def _randomize(model, name, seed, std):
    from fastadapters.patching import _wrappers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in _wrappers(model):
            for container in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
                if name in container:
                    p = container[name].weight
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            if name in w.adapter_scaling:
                w.adapter_scaling[name].fill_(0.8)


def test_parallel_and_lora_mixed_batch_same_greedy_tokens(smollm2, tmp_path):
    run_mixed(smollm2, tmp_path, [], {})


def test_tensor_parallel_2_same_greedy_tokens(smollm2, tmp_path):
    """Item 3: the same requests with --tensor-parallel-size 2 (one CPU process per rank, a core each).
    par_gelu sits on o_proj and down_proj, row-parallel under TP: each rank's shrink output is a partial
    sum that the plugin all-reduces before the activation (gelu of a partial sum would be wrong).
    SmolLM2-135M has 9 attention heads and 3 KV heads, which vLLM cannot split over 2 ranks, so this
    runs a Llama of the same tokenizer and vocabulary with 4 heads / 2 KV heads and random weights."""
    run_mixed(tp_llama(smollm2, tmp_path / "tp_llama"), tmp_path,
              ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"],
              {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})


def tp_llama(smollm2: str, out) -> str:
    """A 2-layer Llama (hidden 128, 4 heads, 2 KV heads) with SmolLM2's tokenizer, fp32, saved to ``out``.
    Weights ~N(0, 0.1): logits spread widely enough that greedy steps are not near-ties."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def run_mixed(smollm2, tmp_path, extra_args: list[str], env: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    fa.patch(model, "parallel", name="par_tanh", bottleneck_size=16, non_linearity="tanh", scaling=2.0)
    fa.patch(model, "parallel", name="par_gelu", bottleneck_size=8, non_linearity="gelu", scaling="learned",
             target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    fa.patch(model, "lora", name="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    paths = {}
    for i, (name, std, fmt) in enumerate((("par_tanh", 0.08, "fastadapters"), ("par_gelu", 0.06, "fastadapters"),
                                          ("lora", 0.05, "peft"))):
        _randomize(model, name, seed=20 + i, std=std)
        paths[name] = fa.save_adapter(model, str(tmp_path / name), name=name, format=fmt)
    del model
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    names = [None, "par_tanh", "par_gelu", "lora", "par_tanh_rt"]
    cases = [(p, a) for p in prompts for a in names]
    ours_paths = dict(paths, par_tanh_rt=paths["par_tanh"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = fastadapters_greedy(smollm2, ours_paths, [p for p, _ in cases], [a for _, a in cases])
    finally:
        torch.set_num_threads(threads)
    base = {tuple(p): o for (p, a), o in zip(cases, ours) if a is None}
    for a in names[1:]:  # every adapter changes some answer, or vLLM ignoring it would pass
        assert any(o != base[tuple(p)] for (p, n), o in zip(cases, ours) if n == a), a
    mods = [f"{n}={paths[n]}" for n in ("par_tanh", "par_gelu", "lora")]
    with vllm_server(smollm2, ["--dtype", "float32", "--enable-lora", "--lora-modules", *mods,
                               "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "256",
                               "--max-num-seqs", "16", *extra_args],
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **env}) as url:
        r = httpx.post(f"{url}/v1/load_lora_adapter", timeout=300,
                       json={"lora_name": "par_tanh_rt", "lora_path": paths["par_tanh"]})
        assert r.status_code == 200, r.text
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            theirs = list(pool.map(lambda c: vllm_greedy(url, c[1] or "smollm2", c[0], N_NEW), cases))
    bad = [(a, i, o, t) for i, ((p, a), o, t) in enumerate(zip(cases, ours, theirs)) if o != t]
    assert not bad, f"{len(bad)} of {len(cases)} requests differ (adapter, case, fastadapters, vLLM): {bad[:3]}"
