"""Everything the engine knows about transformers' internals, in one place.

The engine runs one *packed* forward per step: a single batch row holding every scheduled
request's new tokens back to back, with explicit ``position_ids``. It calls the decoder stack
(``model.get_decoder()``) rather than ``model.forward``: the engine needs the hidden state of one
token per request (the LM head runs on those rows only), and a prefix-tuning wrapper on
``model.forward`` must not add a prefix the engine already put in the request's blocks.

Attention is paged and per request (``paged_attention.py``): the forward runs with the model's
attention implementation switched, for that call only, to ``"fastadapters_paged"`` (registered
once in transformers' ``AttentionInterface``) and with a ``PagedCache`` of the engine's as the
decoder's cache. What the decoder layers do with them (read on transformers 5.24, Llama family):

- ``cache.update(key_states, value_states, layer_idx, ...)`` right after the rotary embedding:
  ``PagedCache.update`` writes the new keys/values straight into the block pool (one
  ``index_copy_`` per layer for the whole step) and hands them back unchanged;
- ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)(module, query, key, value,
  attention_mask, dropout=, scaling=, **kwargs)``: the registered function ignores the packed
  ``key``/``value`` and attends each request's query rows to that request's own blocks in place;
  the step's block tables reach it through the ``fastadapters_paged`` keyword, which the decoder
  passes down to the attention call with its other ``**kwargs``;
- ``create_causal_mask`` builds no mask for an implementation that has no registered mask
  function (its early exit), so nothing of size tokens x context is ever built.

Every forward counts the ``update`` and attention calls; if a transformers release stops making
them (a renamed keyword, a cache it no longer calls), the step fails with a RuntimeError naming
the installed transformers version instead of computing something else.

Supported models: decoder-only families whose layers all use full attention (Llama, Mistral/Qwen2
without a sliding window, ...); anything else is refused by ``check_model`` with the reason.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from ..models import attention_geometry
from .paged_attention import StepTables, paged_attention

__all__ = ["check_model", "geometry", "paged_forward", "PagedCache", "ATTN_NAME"]

ATTN_NAME = "fastadapters_paged"
_KWARG = "fastadapters_paged"
_registered = False
_register_lock = threading.Lock()


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
    # what a family's forward does to the logits (or the head's input) beyond a plain linear head:
    # softcapping (Gemma 2), logit_scale (Cohere), logits_scaling (Granite and MiniCPM3 divide by it,
    # HyperCLOVAX multiplies), lm_head_multiplier (Falcon-H1); the engine's LM head runs the linear
    # alone, so these would change every sampled distribution and log-probability (greedy survives)
    for attr in ("final_logit_softcapping", "logit_scale", "attn_logit_softcapping", "logits_scaling",
                 "lm_head_multiplier", "output_multiplier"):
        if getattr(text, attr, None) not in (None, 1.0):
            raise ValueError(f"serving applies plain attention and a plain linear LM head; this model has {attr}="
                             f"{getattr(text, attr)!r}, which it would skip")
    if text is not cfg:
        raise ValueError(f"serving needs a text-only causal LM whose config is its text config; "
                         f"got {type(cfg).__name__} with a separate text config")
    geometry(model)


def _register() -> None:
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        try:
            from transformers import AttentionInterface
        except ImportError as e:  # pragma: no cover - transformers < 4.48
            raise RuntimeError(_contract(f"transformers.AttentionInterface is missing ({e})")) from None
        AttentionInterface.register(ATTN_NAME, _attention)
        _registered = True


def _contract(what: str) -> str:
    import transformers

    return (f"fastadapters serving: the paged-attention contract with transformers {transformers.__version__} "
            f"is not met: {what}. The engine was written against transformers 5.24 (Llama-family attention "
            "calling cache.update(...) and the AttentionInterface function with the decoder's **kwargs).")


class PagedCache:
    """The decoder's cache for one engine step: ``update`` writes the step's new keys/values into
    the block pool at the slots the engine computed (``tables.new_slots``)."""

    is_compileable = False

    def __init__(self, pool, tables: StepTables):
        self.pool, self.tables = pool, tables
        self.updates = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx=None, *args, **kwargs):
        if layer_idx is None:
            layer_idx = kwargs.get("layer_idx")
        if not isinstance(layer_idx, int):
            raise RuntimeError(_contract(f"cache.update was called without a layer index (got {layer_idx!r})"))
        pool = self.pool
        # (1, Hkv, T, D) -> (T, Hkv, D) rows of the flat (slots, Hkv, D) view of this layer's blocks
        k = key_states[0].transpose(0, 1)
        v = value_states[0].transpose(0, 1)
        pool.flat_keys[layer_idx].index_copy_(0, self.tables.new_slots, k.to(pool.dtype))
        pool.flat_values[layer_idx].index_copy_(0, self.tables.new_slots, v.to(pool.dtype))
        self.updates += 1
        return key_states, value_states

    # what a transformers Cache answers when generic code asks (the decoder's own path asks nothing)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.pool.num_layers


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    step = kwargs.get(_KWARG)
    if step is None:
        raise RuntimeError(_contract("the attention function was called without the engine's block tables "
                                     f"(the '{_KWARG}' keyword did not reach it)"))
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise RuntimeError(_contract("the attention module has no integer layer_idx"))
    cache, tables = step
    for extra in ("s_aux", "softcap", "sliding_window"):
        if kwargs.get(extra) is not None:
            raise RuntimeError(_contract(f"the model passes {extra}={kwargs[extra]!r} to its attention, which the "
                                         "engine's paged attention does not apply"))
    cache.attention_calls = getattr(cache, "attention_calls", 0) + 1
    out = paged_attention(query, cache.pool, layer, tables, scaling)
    return out, None


@torch.no_grad()
def paged_forward(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, pool,
                  tables: StepTables, last_index: torch.Tensor, head=None) -> torch.Tensor:
    """One packed step over the block pool. ``input_ids``/``position_ids``: (1, T); ``tables``: the
    step's per-request block tables and the new tokens' slots; ``last_index``: the token positions
    (within T) whose hidden states go through the LM head (``head``, default the model's output
    layer; the engine passes ``lm_head.lm_head``'s; False: none, the hidden states are returned).
    Returns logits (len(last_index), V);
    the new keys/values are in the pool when it returns."""
    _register()
    cache = PagedCache(pool, tables)
    config = model.config
    previous = config._attn_implementation
    decoder = model.get_decoder()
    config._attn_implementation = ATTN_NAME
    try:
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=True,
                      **{_cache_keyword(decoder): cache, _KWARG: (cache, tables)})
    finally:
        config._attn_implementation = previous
    calls = getattr(cache, "attention_calls", 0)
    if cache.updates != pool.num_layers or calls != pool.num_layers:
        raise RuntimeError(_contract(f"one forward made {cache.updates} cache updates and {calls} attention calls "
                                     f"for {pool.num_layers} layers"))
    hidden = out.last_hidden_state[0].index_select(0, last_index)
    if head is False:  # the caller runs the LM head (the engine's CUDA-graph steps)
        return hidden
    return (head or model.get_output_embeddings())(hidden).float()


def _cache_keyword(decoder: nn.Module) -> str:
    fwd = type(decoder).forward
    kw = _CACHE_KEYWORD.get(fwd)
    if kw is None:
        import inspect

        kw = "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
        _CACHE_KEYWORD[fwd] = kw
    return kw


_CACHE_KEYWORD: dict = {}
