"""Everything the engine knows about transformers' internals, in one place.

The engine runs one *packed* forward per step: a single batch row holding every scheduled
request's new tokens back to back, the requests' past keys/values (gathered from the block pool)
placed before them in a ``DynamicCache``, explicit ``position_ids``, and a 4-D additive attention
mask that lets each token see only its own request's past and its own request's earlier tokens.
It calls the decoder stack (``model.get_decoder()``) rather than ``model.forward``: the engine
needs the hidden state of one token per request (the LM head runs on those rows only), and a
prefix-tuning wrapper on ``model.forward`` must not add a prefix the engine already put in the
request's blocks.

What is version-specific here: how a ``DynamicCache`` is filled and read back (``layers[i].keys``
on transformers >= 4.56, ``key_cache[i]`` before), the keyword that takes it (``cache`` where the
decoder's forward has one -- 5.24 deprecates ``past_key_values`` -- else ``past_key_values``), and that a 4-D mask is passed through to the
attention functions as given (``masking_utils`` returns a 4-D mask unchanged).

Supported models: decoder-only families whose layers all use full attention over a
``DynamicCache`` (Llama, Mistral/Qwen2 without a sliding window, ...); anything else is refused
by ``check_model`` with the reason.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models import attention_geometry

__all__ = ["check_model", "geometry", "packed_forward"]


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of the model's attention."""
    return attention_geometry(model.config)


def check_model(model: nn.Module) -> None:
    """ValueError naming why the engine cannot serve ``model``; None if it can."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        raise ValueError(f"serving needs a transformers causal LM (config, get_decoder, an LM head); "
                         f"got {type(model).__name__}")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "is_encoder_decoder", False):
        raise ValueError("serving supports decoder-only models; this one is an encoder-decoder")
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if getattr(text, "sliding_window", None) or types - {"full_attention"}:
        raise ValueError(f"serving needs full attention in every layer; this model has layer types {sorted(types)} "
                         f"and sliding_window={getattr(text, 'sliding_window', None)}")
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(text, attr, None) not in (None, 1.0):
            raise ValueError(f"serving applies the LM head as a plain linear; this model has {attr}="
                             f"{getattr(text, attr)!r}, which it would skip")
    geometry(model)


def _fill(cache, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)


def _layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        entry = cache.layers[layer]
        return entry.keys, entry.values
    return cache.key_cache[layer], cache.value_cache[layer]  # pragma: no cover - older transformers


def _cache_keyword(decoder: nn.Module) -> str:
    fwd = type(decoder).forward
    kw = _CACHE_KEYWORD.get(fwd)
    if kw is None:
        import inspect

        kw = "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
        _CACHE_KEYWORD[fwd] = kw
    return kw


_CACHE_KEYWORD: dict = {}


def _new_cache():
    from transformers.cache_utils import DynamicCache

    return DynamicCache()


def packed_mask(past_lengths: list[int], new_lengths: list[int], dtype: torch.dtype, device: torch.device,
                boolean: bool = False) -> torch.Tensor:
    """(1, 1, sum(new), sum(past) + sum(new)) mask: each token sees its request's past and its own
    request's tokens up to itself. ``boolean``: True where it may attend (what SDPA takes, a
    quarter of the bytes); else additive, 0 or the dtype's minimum (eager attention)."""
    total_new, total_past = sum(new_lengths), sum(past_lengths)
    allowed = torch.zeros(total_new, total_past + total_new, dtype=torch.bool, device=device)
    p0 = n0 = 0
    for lp, ln in zip(past_lengths, new_lengths):
        allowed[n0:n0 + ln, p0:p0 + lp] = True
        allowed[n0:n0 + ln, total_past + n0:total_past + n0 + ln] = torch.ones(ln, ln, dtype=torch.bool,
                                                                               device=device).tril()
        p0 += lp
        n0 += ln
    if boolean:
        return allowed[None, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _takes_boolean_mask(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@torch.no_grad()
def packed_forward(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   past_keys: list[torch.Tensor] | None, past_values: list[torch.Tensor] | None,
                   past_lengths: list[int], new_lengths: list[int], last_index: torch.Tensor):
    """One packed step. ``input_ids``/``position_ids``: (1, T); ``past_keys[layer]``: (1, H, L, D)
    (None when no request has a past); ``last_index``: the token positions (within T) whose hidden
    states go through the LM head. Returns (logits (len(last_index), V), new keys, new values),
    the new keys/values per layer as (H, T, D)."""
    cache = _new_cache()
    if past_keys is not None:
        _fill(cache, past_keys, past_values)
    emb = model.get_input_embeddings()
    dtype = emb.weight.dtype
    mask = packed_mask(past_lengths, new_lengths, dtype, input_ids.device, boolean=_takes_boolean_mask(model))
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                  **{_cache_keyword(decoder): cache})
    hidden = out.last_hidden_state[0].index_select(0, last_index)
    logits = model.get_output_embeddings()(hidden).float()
    past = sum(past_lengths)
    new_k, new_v = [], []
    for layer in range(len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)):
        k, v = _layer_kv(cache, layer)
        new_k.append(k[0, :, past:])
        new_v.append(v[0, :, past:])
    return logits, new_k, new_v
