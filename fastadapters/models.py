"""Per-architecture facts, as data: one row per model family, keyed by ``config.model_type``.

A new family is a new row. Target names are suffixes of module paths, matched as PEFT does
(``name == t`` or ``name.endswith("." + t)``). Defaults follow the LLM-Adapters target-module
mappings: LoRA on attention projections, series adapters on the FFN linears (the FFN output linear
gets the output placement), Pfeiffer on the FFN output only, parallel on the attention projections.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    lora: tuple[str, ...]
    series: tuple[str, ...]
    pfeiffer: tuple[str, ...]
    parallel: tuple[str, ...]
    ffn_output: tuple[str, ...]  # targets that take the output placement under variant="houlsby"
    # sibling linears (child names of one parent) that the family's forward calls one after the
    # other on the same tensor: LoRA on several of them can share the read of that input
    shared_input: tuple[tuple[str, ...], ...] = ()


_LLAMA = Architecture(
    lora=("q_proj", "v_proj"),
    series=("gate_proj", "up_proj", "down_proj"),
    pfeiffer=("down_proj",),
    parallel=("q_proj", "k_proj", "v_proj"),
    ffn_output=("down_proj",),
    shared_input=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
)

# bloom and gpt_neox: one fused query_key_value projection, dense_h_to_4h / dense_4h_to_h FFN
_FUSED_QKV = Architecture(
    lora=("query_key_value",),
    series=("dense_h_to_4h", "dense_4h_to_h"),
    pfeiffer=("dense_4h_to_h",),
    parallel=("query_key_value",),
    ffn_output=("dense_4h_to_h",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bloom": _FUSED_QKV,
    "gpt_neox": _FUSED_QKV,
    "opt": Architecture(
        lora=("q_proj", "v_proj"),
        series=("fc1", "fc2"),
        pfeiffer=("fc2",),
        parallel=("q_proj", "k_proj", "v_proj"),
        ffn_output=("fc2",),
        shared_input=(("q_proj", "k_proj", "v_proj"),),
    ),
    "gptj": Architecture(
        lora=("q_proj", "v_proj"),
        series=("fc_in", "fc_out"),
        pfeiffer=("fc_out",),
        parallel=("q_proj", "k_proj", "v_proj"),
        ffn_output=("fc_out",),
        shared_input=(("q_proj", "k_proj", "v_proj"),),
    ),
    "gpt2": Architecture(
        lora=("c_attn",),
        series=("mlp.c_fc", "mlp.c_proj"),
        pfeiffer=("mlp.c_proj",),
        parallel=("c_attn",),
        ffn_output=("mlp.c_proj",),
    ),
}


def architecture_of(model) -> Architecture | None:
    cfg = getattr(model, "config", None)
    return ARCHITECTURES.get(getattr(cfg, "model_type", None))


def default_targets(model, adapter: str, variant: str | None = None) -> list[str]:
    """The default target modules for ``adapter`` on ``model``; a ValueError if the family is unknown."""
    arch = architecture_of(model)
    if arch is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"no default target_modules for model_type {mt!r}; pass target_modules=[...] "
            f"(known families: {', '.join(sorted(ARCHITECTURES))})")
    key = "pfeiffer" if (adapter == "series" and variant == "pfeiffer") else adapter
    return list(getattr(arch, key))


def matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def is_ffn_output(model, name: str) -> bool:
    arch = architecture_of(model)
    return arch is not None and matches(name, arch.ffn_output)


def attention_geometry(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config, whatever the family calls them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return int(layers), int(kv), int(head_dim)
