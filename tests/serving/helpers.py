"""Shared pieces of the serving tests: a tiny llama and the mixed adapter zoo of issue 4.

The zoo: LoRA adapters of ranks 1, 4, 8, 16, 64 (alpha varies, on q/v/o projections and, for one,
the MLP), series adapters in the Houlsby and Pfeiffer placements (tanh and relu) and a parallel
adapter (gelu, learned scaling) -- every adapter's weights random (no zero-initialised B/U), so
every row differs from the base model.
"""
from __future__ import annotations

import torch

import fastadapters as fa

VOCAB = 64
LORA_RANKS = {"lora_r1": 1, "lora_r4": 4, "lora_r8": 8, "lora_r16": 16, "lora_r64": 64}
SERIES = {"houlsby": dict(variant="houlsby", bottleneck_size=12, non_linearity="tanh"),
          "pfeiffer": dict(variant="pfeiffer", bottleneck_size=5, non_linearity="relu")}
PARALLEL = {"parallel": dict(bottleneck_size=7, non_linearity="gelu", scaling="learned")}
ZOO = list(LORA_RANKS) + list(SERIES) + list(PARALLEL)


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def randomize_adapter(model, name: str, seed: int, std: float = 0.3) -> None:
    """Give adapter ``name`` random (non-zero) weights in place."""
    g = torch.Generator().manual_seed(seed)
    from fastadapters.patching import _wrappers

    with torch.no_grad():
        for _, w in _wrappers(model):
            for container in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
                if name in container:
                    p = container[name].weight
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            if name in w.adapter_scaling:
                w.adapter_scaling[name].fill_(0.7)


def add_zoo(model, names=ZOO, seed: int = 1):
    """Patch ``model`` with the adapters in ``names`` (subset of ZOO), each randomised."""
    for i, name in enumerate(names):
        if name in LORA_RANKS:
            r = LORA_RANKS[name]
            targets = ["q_proj", "v_proj", "o_proj"] + (["down_proj"] if r == 8 else [])
            fa.patch(model, "lora", name=name, r=r, alpha=2 * r if r != 4 else 3, target_modules=targets)
        elif name in SERIES:
            fa.patch(model, "series", name=name, **SERIES[name])
        elif name in PARALLEL:
            fa.patch(model, "parallel", name=name, **PARALLEL[name])
        else:
            raise KeyError(name)
        randomize_adapter(model, name, seed + i)
    return model


def run_alone(model, input_ids, name, **kw):
    """Logits of ``input_ids`` with only adapter ``name`` active (None: the base model)."""
    fa.set_adapter(model, None if name == "__base__" else name)
    with torch.no_grad():
        return model(input_ids, **kw).logits
