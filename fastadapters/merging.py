"""Fold LoRA adapters into the base weights: ``merge`` and ``merge_and_unload``.

LoRA is linear in x, so W' = W + s·B·A gives the patched layer's output with a plain linear
(PEFT's merge; for transformers' Conv1D, whose weight is stored (in, out), the transpose is added,
PEFT's ``fan_in_fan_out``). The sum is formed in fp32 (fp64 for an fp64 base) and rounded once to
the base weight's dtype, which is kept.

Bottleneck adapters (series, parallel) put a non-linearity between their two matrices
(y = W(x + s·U·act(D·x)) + b and its relatives) and prefix-tuning adds key/value positions rather
than weights, so neither folds into a linear: both are refused with the reason, and the model is
left as it was. Every check runs before the first weight changes.

``merge`` folds one adapter and removes it; what stays on the model (other adapters,
``set_adapter(model, None)``) runs on the merged weights from then on. ``merge_and_unload`` folds the
last adapter of a model and hands back the plain model: no wrapper, state dict keys as before patching.
A model that transformers loaded from a GGUF file and dequantized (every weight a float tensor) is
still marked as GGUF-quantized, which makes ``save_pretrained`` refuse it; ``merge_and_unload`` drops
that marker, so the merged model saves like any other.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import patching
from .config import LoRAConfig
from .distributed import refuse_adapter_change_if_sharded
from .layers import AdapterLinear, base_weight_nk


def _why_not_foldable(name: str, cfg) -> str:
    kind = cfg.adapter_type
    if kind == "prefix":
        return (f"adapter {name!r} is a prefix adapter: it adds key/value positions to every attention "
                "layer, not weights to a linear, so it cannot be merged")
    placement = f" ({cfg.variant} placement)" if kind == "series" else ""
    return (f"adapter {name!r} is a {kind} adapter{placement}: its branch U·act(D·z) has a {cfg.non_linearity} "
            "between its two matrices, so it does not fold into the linear weights (only LoRA adapters merge); "
            "keep it patched and save it with fastadapters.save_adapter")


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in the model, for parameters held under several names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


def _check_mergeable(model: nn.Module, name: str | None) -> tuple[str, list[tuple[str, AdapterLinear]]]:
    """(adapter name, [(path, wrapper)]) to fold, or a ValueError saying why not (nothing changed)."""
    refuse_adapter_change_if_sharded(model, "merge(model)")  # the fold would end in a refused delete_adapter
    st = patching._require_state(model)
    if name is None:
        name = st.active
        if name is None:
            raise ValueError(f"no adapter is active; pass name=... (loaded: {list(st.configs)})")
    if name not in st.configs:
        raise ValueError(f"no adapter named {name!r}; loaded: {list(st.configs)}")
    cfg = st.configs[name]
    if not isinstance(cfg, LoRAConfig):
        raise ValueError(_why_not_foldable(name, cfg))
    shared = _shared_weights(model)
    layers = []
    for path in st.kinds[name]:
        w = model.get_submodule(path)
        if not isinstance(w, AdapterLinear) or name not in w.specs:
            continue  # already folded by an earlier merge that stopped part-way
        if w.routing is not None:
            raise ValueError(f"cannot merge inside fastadapters.route(...): {path} is routing rows to adapters")
        if not w.fusable:
            raise ValueError(f"cannot merge adapter {name!r} into {path}: its base layer "
                             f"({type(w.base_layer).__name__}) has its own forward (a quantised or custom "
                             "linear), so its weight is not what it multiplies by; merge on a plain "
                             "nn.Linear / Conv1D copy of the base model")
        weight = w.base_layer.weight
        if weight.device.type == "meta" or not weight.is_floating_point():
            raise ValueError(f"cannot merge adapter {name!r} into {path}: its base weight is "
                             f"{weight.dtype} on {weight.device} (offloaded or quantised); load the base "
                             "weights in a floating dtype on a real device first")
        if id(weight) in shared:
            raise ValueError(f"cannot merge adapter {name!r} into {path}: its weight is shared with "
                             f"{[n for n in shared[id(weight)] if not n.startswith(path + '.')]} (tied "
                             "weights), which the merge would change too")
        layers.append((path, w))
    return name, layers


@torch.no_grad()
def _fold(w: AdapterLinear, name: str) -> None:
    """W += s·B·A on one layer, summed in fp32 (fp64 for fp64 weights), rounded once to W's dtype."""
    weight = w.base_layer.weight
    acc = torch.promote_types(weight.dtype, torch.float32)
    A = w.lora_A[name].weight.to(device=weight.device, dtype=acc)
    B = w.lora_B[name].weight.to(device=weight.device, dtype=acc)
    delta = (B @ A).mul_(w.specs[name].scaling)  # (out, in)
    target = base_weight_nk(w.base_layer)  # (out, in); a transposed view of a Conv1D weight
    target.copy_(target.to(acc).add_(delta))


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold LoRA adapter ``name`` (default: the active one) into the base weights and remove it.

    The model's outputs with that adapter active are unchanged (up to the rounding of the new weight
    to its dtype). Any adapter left on the model, and the bare model (``set_adapter(model, None)``),
    run on the merged weights afterwards. Series, parallel and prefix adapters do not fold into a
    linear and are refused (ValueError naming the adapter), as are quantised / custom base layers,
    tied weights and a model inside ``fastadapters.route``; a refused merge changes nothing.
    """
    name, layers = _check_mergeable(model, name)
    done = 0
    try:
        for path, w in layers:
            _fold(w, name)
            w.delete_adapter(name)  # folded: this layer no longer adds the branch
            done += 1
    except BaseException as e:  # e.g. out of memory: the folded layers carry no branch, the rest still
        # do, so the outputs stay right and merge can be called again
        e.add_note(f"fastadapters.merge stopped after {done} of {len(layers)} layers of adapter {name!r}; "
                   "the model's outputs are unchanged; call merge again to fold the rest")
        raise
    patching.delete_adapter(model, name)
    return model


def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold LoRA adapter ``name`` (default: the active one) into the base weights and return the
    plain model: no adapter module is left and the state dict has the keys it had before patching.

    The model must hold no other adapter (it would be dropped without a word otherwise): fold
    other LoRA adapters first with ``merge`` or remove them with ``delete_adapter``.
    """
    st = patching._require_state(model)
    name_ = st.active if name is None else name
    others = [f"{n!r} ({c.adapter_type})" for n, c in st.configs.items() if n != name_]
    if others and name_ in st.configs:
        raise ValueError(f"merge_and_unload folds adapter {name_!r} and removes every adapter, but the model also "
                         f"holds {', '.join(others)}; fold LoRA ones first with fastadapters.merge(model, name) "
                         "or remove them with fastadapters.delete_adapter(model, name)")
    merge(model, name)
    drop_dequantized_gguf_marker(model)  # the merged model is plain float weights: let it save
    return model


def _quant_method(model) -> str | None:
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    return None if method is None else str(getattr(method, "value", method)).lower()


def clear_quantization_marker(model: nn.Module) -> None:
    """Forget that transformers loaded ``model`` quantized (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``). Only for a model whose every tensor is already a float."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def drop_dequantized_gguf_marker(model: nn.Module) -> bool:
    """A GGUF model that transformers dequantized while loading (its loader on a CPU, or without a
    GGUF kernel) holds float weights yet keeps the GGUF quantizer, and ``save_pretrained`` refuses
    it ("quantized with gguf and is not serializable"). Drop that marker when every parameter and
    buffer is a float tensor; True when it was dropped. A model kept in GGUF blocks is left alone."""
    if _quant_method(model) != "gguf":
        return False
    if any(not t.is_floating_point() for t in [*model.parameters(), *model.buffers()]):
        return False
    clear_quantization_marker(model)
    return True
