"""``patch`` / ``unpatch`` and named-adapter management, on the model *instance*.

Patching swaps each target linear for an ``AdapterLinear`` that wraps it (classes in transformers
are never touched). Prefix-tuning adds a ``PrefixEncoder`` under ``fastadapters_prefix`` and wraps
the instance's ``forward`` so that prefixes enter through the model's own KV cache (see
``_prefix_forward``). Everything is validated before the first change, so a failed ``patch``
leaves the model exactly as it was. ``unpatch`` puts the original modules, ``forward`` and
``requires_grad`` flags back: the state dict is identical, key for key and bit for bit.
While a transformers model is patched, its ``save_pretrained`` refuses (``SavePretrainedRefusal``):
the wrapper keys would reload as random weights in plain transformers.

The bookkeeping lives in ``model._fastadapters`` (a plain object, not a module, so it adds
nothing to the state dict).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from . import models
from .config import ADAPTER_SPELLINGS, ALL_LINEAR, AdapterConfig, PrefixConfig, SeriesConfig, make_config
from .distributed import refuse_adapter_change_if_sharded, sharding_of
from .layers import SUPPORTED_BASES, AdapterLinear, PrefixEncoder, SharedInput
from .ops import dispatch

PREFIX_MODULE = "fastadapters_prefix"
RESERVED_NAMES = ("__base__",)


@dataclass
class PatchState:
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter -> {module path: kind}
    active: str | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict)  # original flags of base params
    wrapped: list[str] = field(default_factory=list)  # module paths now holding an AdapterLinear
    orig_forward: Any = None  # set while a prefix adapter is present
    instance_forward: Any = None  # a forward set on the instance (e.g. accelerate's hook) that orig_forward is
    backend: str | None = None
    version: int = 0  # bumped whenever adapters are added or removed (the serving store rebuilds on it)
    instance_save: Any = None  # a save_pretrained the instance had before patching (put back by unpatch)


class SavePretrainedRefusal:
    """Stands in for ``save_pretrained`` on a patched transformers model (an instance attribute,
    removed by ``unpatch``). The state dict of a patched model holds wrapper keys (``base_layer``,
    ``lora_A``, ...) that plain transformers would load as missing weights, initialised at random;
    so nothing is written and the error says which call gives what the user wants."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            "save_pretrained on a model patched by fastadapters would write adapter wrapper keys "
            "(base_layer, lora_A, adapter_down, ...) that plain transformers cannot load; nothing was written. "
            "For the adapter: fastadapters.save_adapter(model, path); for a model with its LoRA adapter "
            "folded in: fastadapters.merge_and_unload(model), then save_pretrained; for the base model: "
            "fastadapters.unpatch(model), then save_pretrained")


def _guard_save_pretrained(model: nn.Module, st: PatchState, undo: list) -> None:
    if not callable(getattr(model, "save_pretrained", None)):
        return
    st.instance_save = model.__dict__.get("save_pretrained")
    model.__dict__["save_pretrained"] = SavePretrainedRefusal()
    undo.append(functools.partial(_unguard_save_pretrained, model, st))


def _unguard_save_pretrained(model: nn.Module, st: PatchState) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), SavePretrainedRefusal):
        del model.__dict__["save_pretrained"]
        if st.instance_save is not None:
            model.__dict__["save_pretrained"] = st.instance_save
    st.instance_save = None


def _state(model: nn.Module) -> PatchState | None:
    return model.__dict__.get("_fastadapters")


# wrappers that hold the model they run as a submodule: DistributedDataParallel / DataParallel
# (``module``) and torch.compile's OptimizedModule (``_orig_mod``)
_WRAPPER_ATTRIBUTES = ("module", "_orig_mod")


def _refuse_wrapper_of_patched(model: nn.Module) -> None:
    """A wrapper around a patched model has no adapters of its own: say which attribute holds them
    (instead of "call patch first" to someone who did, or an empty adapter list)."""
    for attr in _WRAPPER_ATTRIBUTES:
        inner = model._modules.get(attr)
        if inner is not None and _state(inner) is not None:
            raise ValueError(f"this is a {type(model).__name__} around a patched model: pass the model inside it, "
                             f"model.{attr} (e.g. fastadapters.save_adapter(model.{attr}, path)); the wrapper itself "
                             "holds no adapters")


def _require_state(model: nn.Module) -> PatchState:
    st = _state(model)
    if st is None:
        _refuse_wrapper_of_patched(model)
        raise ValueError("this model has no fastadapters adapters; call fastadapters.patch(model, ...) first")
    return st


def adapter_names(model: nn.Module) -> list[str]:
    st = _state(model)
    if st is None:
        _refuse_wrapper_of_patched(model)
    return list(st.configs) if st else []


def get_config(model: nn.Module, name: str | None = None) -> AdapterConfig:
    st = _require_state(model)
    name = st.active if name is None else name
    if name not in st.configs:
        raise ValueError(f"no adapter named {name!r}; loaded: {list(st.configs)}")
    cfg = st.configs[name]
    return type(cfg).from_dict(cfg.to_dict())  # a copy: editing it does not change the patched model


def _check_name(st: PatchState | None, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name in RESERVED_NAMES:
        raise ValueError(f"name: got {name!r}; valid: a non-empty string without '.', not {RESERVED_NAMES}")
    # adapter weights are entries of nn.ModuleDict / nn.ParameterDict, which refuse keys that are
    # already attributes ("update", "values", "training", ...) -- only after modules were wrapped
    if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"name: got {name!r}; valid: a non-empty string without '.' that is not an attribute "
                         "of torch.nn.ModuleDict / ParameterDict (where adapter weights are kept)")
    if st is not None and name in st.configs:
        raise ValueError(f"an adapter named {name!r} is already on this model (loaded: {list(st.configs)}); "
                         "pick another name or fastadapters.delete_adapter(model, name) first")


def _modules_to_wrappers(model: nn.Module, skip: str | None = None):
    """(path, module) as ``named_modules`` gives them (pre-order, a module reachable twice once,
    under its first path), but not below a wrapper nor at / below the top-level ``skip``: a wrapper
    holds every loaded adapter's modules, so walking them made each patch, load and set_adapter cost
    grow with the adapters already loaded (quadratically over a server's loads)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        yield path, mod
        if isinstance(mod, AdapterLinear):
            continue
        children = [(f"{path}.{name}" if path else name, child) for name, child in mod._modules.items()
                    if child is not None]
        stack.extend((p, c) for p, c in reversed(children) if p != skip)


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Candidate modules by path: wrappers count under their own path, their insides are skipped,
    and so are our own prefix encoders (their linears are adapter weights, not targets)."""
    return dict(_modules_to_wrappers(model, skip=PREFIX_MODULE))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _resolve_targets(model: nn.Module, cfg: AdapterConfig) -> dict[str, str]:
    """{module path: kind} for a non-prefix config; a ValueError naming what is valid otherwise.

    Every name the user gave must match a module (a typo is an error listing the model's linear
    module names, not a silent half-patch); ``"all-linear"`` is every linear layer but the output
    head, as in PEFT, and the config's ``target_modules`` becomes the names it stood for (as PEFT
    does), so a saved adapter says what it adapted. The architecture's defaults (used when
    ``target_modules`` is None) need only match somewhere.
    """
    variant = cfg.variant if isinstance(cfg, SeriesConfig) else None
    mods = _linear_modules(model)
    linear = {p: m for p, m in mods.items() if p and isinstance(m, SUPPORTED_BASES + (AdapterLinear,))}
    linear_names = sorted({p.rsplit(".", 1)[-1] for p in linear})
    given = cfg.target_modules
    if given == [ALL_LINEAR]:
        head = _output_head(model)

        def is_head(m):
            return head is not None and (m is head or getattr(m, "base_layer", None) is head)
        keep = sorted(p for p, m in linear.items() if not is_head(m))
        if not keep:
            raise ValueError(f'target_modules "{ALL_LINEAR}": this model has no linear layer besides its output head')
        targets = sorted({p.rsplit(".", 1)[-1] for p in keep})
        if {p for p in mods if p and models.matches(p, targets)} != set(keep):  # a leaf name shared with
            targets = keep  # the head or a non-linear module: name the layers in full
    else:
        targets = given or models.default_targets(model, cfg.adapter_type, variant)
        if given:
            missing = [t for t in targets if not any(models.matches(p, [t]) for p in mods if p)]
            if missing:
                raise ValueError(f"target_modules {missing} matched no module of this model; its linear modules "
                                 f"are named: {linear_names} (names are module-name suffixes such as "
                                 f"'q_proj' or 'mlp.down_proj', or \"{ALL_LINEAR}\")")
    found = {p: m for p, m in mods.items() if p and models.matches(p, targets)}
    if not found:
        raise ValueError(f"target_modules {list(targets)} matched no module of this model; "
                         f"its linear modules are named: {linear_names}")
    bad = [f"{p} ({type(m).__name__})" for p, m in found.items()
           if not isinstance(m, SUPPORTED_BASES + (AdapterLinear,))]
    if bad:
        raise ValueError(f"target_modules matched modules that are not linear layers: {bad[:5]}; "
                         "valid targets are nn.Linear or transformers Conv1D modules")
    if given == [ALL_LINEAR]:
        cfg.target_modules = list(targets)  # what "all-linear" stood for, so a saved config reloads as it was
    kinds = {}
    for p in found:
        if cfg.adapter_type == "lora":
            kinds[p] = "lora"
        elif cfg.adapter_type == "parallel":
            kinds[p] = "parallel"
        elif variant == "pfeiffer":
            kinds[p] = "output"
        else:  # houlsby: output placement on the FFN output linear, mh elsewhere
            kinds[p] = "output" if models.is_ffn_output(model, p) else "mh"
    return kinds


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _wrappers(model: nn.Module):
    for path, mod in _modules_to_wrappers(model):
        if isinstance(mod, AdapterLinear):
            yield path, mod


def _prefix_encoders(model: nn.Module) -> nn.ModuleDict | None:
    return model._modules.get(PREFIX_MODULE)


def _adapter_params(model: nn.Module, name: str):
    for _, w in _wrappers(model):
        yield from w.adapter_parameters(name)
    enc = _prefix_encoders(model)
    if enc is not None and name in enc:
        yield from enc[name].parameters()


def _mark_trainable(model: nn.Module, st: PatchState) -> None:
    wrappers = [w for _, w in _wrappers(model)]  # one walk of the model, not one per adapter
    enc = _prefix_encoders(model)
    for name in st.configs:
        on = name == st.active
        for w in wrappers:
            for p in w.adapter_parameters(name):
                p.requires_grad_(on)
        if enc is not None and name in enc:
            for p in enc[name].parameters():
                p.requires_grad_(on)


def patch(model: nn.Module, adapter: str | None = None, *, config: AdapterConfig | None = None,
          name: str = "default", backend: str | None = None, **fields) -> nn.Module:
    """Add adapter ``name`` to ``model`` (in place) and return the model.

    ``adapter`` is "lora" | "series" | "houlsby" | "pfeiffer" | "parallel" | "prefix" (the command
    line's spellings; "houlsby" / "pfeiffer" are series adapters with that variant) with the
    config's fields as keywords, or ``config`` is a ready config. ``target_modules``: None (the
    architecture's default), module-name suffixes (a list or "q_proj,v_proj"), or "all-linear";
    a name that matches no module is an error. The first adapter becomes active; later ones are added beside
    it (``set_adapter`` switches). The base is frozen; only the active adapter trains.
    """
    # ---- validate everything first: nothing changes on error ----
    if config is None:
        if adapter is None:
            raise ValueError(f"patch needs adapter=... ({', '.join(ADAPTER_SPELLINGS)}) or config=...")
        cfg = make_config(adapter, **fields)
    else:
        if adapter is not None or fields:
            raise ValueError("pass either config=... or adapter=... with fields, not both")
        if not isinstance(config, AdapterConfig) or not config.adapter_type:
            raise ValueError(f"config: got {type(config).__name__}; valid: LoRAConfig, SeriesConfig, "
                             "ParallelConfig, PrefixConfig")
        cfg = type(config).from_dict(config.to_dict())  # a validated private copy
    _check_model_backend(backend)
    _check_unsharded(model)
    st = _state(model)
    _check_name(st, name)
    if isinstance(cfg, PrefixConfig):
        if not hasattr(model, "config"):
            raise ValueError("prefix-tuning needs a transformers model (with .config)")
        try:
            geometry = models.attention_geometry(model.config)
        except AttributeError as e:
            raise ValueError(f"prefix-tuning could not read the attention geometry from the config: {e}") from None
        if st is not None and st.orig_forward is None and "forward" in model.__dict__:
            raise ValueError("this model instance already has its forward replaced; prefix-tuning cannot wrap it")
        if st is None or st.orig_forward is None:
            _prefix_cache_argument(model.forward, type(model).__name__, type(model).forward)  # raises where
            # the contract changed
        kinds: dict[str, str] = {}
    else:
        geometry = None
        kinds = _resolve_targets(model, cfg)

    # ---- apply (an error here, out-of-memory included, is rolled back) ----
    undo: list = []  # closures that take back what this call did, newest last
    try:
        _apply(model, st, name, cfg, kinds, backend, geometry, undo)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    _link_shared_inputs(model)
    return model


def _check_unsharded(model: nn.Module) -> None:
    """Refuse a model that a data-parallel wrapper already took over (FSDP2 ``fully_shard``, FSDP1, DDP):
    the adapters ``patch`` adds would never be all-gathered or reduced, so ranks would silently diverge."""
    how = sharding_of(model)
    if how is not None:
        raise ValueError(f"this model is already wrapped for data parallelism ({how}); fastadapters.patch must come "
                         "first: patch (or load_adapter) the plain model, then wrap it in DistributedDataParallel "
                         "or shard it (fastadapters.distributed.shard_model, or fully_shard per decoder layer "
                         "and at the root)")


def _apply(model: nn.Module, st: PatchState | None, name: str, cfg: AdapterConfig, kinds: dict[str, str],
           backend: str | None, geometry, undo: list) -> PatchState:
    """The changing half of ``patch``; every change pushes its inverse onto ``undo``."""
    first = st is None
    if first:
        st = PatchState(backend=backend)
        st.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.__dict__["_fastadapters"] = st
        undo.append(lambda: model.__dict__.pop("_fastadapters", None))
        _guard_save_pretrained(model, st, undo)
        for n, p in model.named_parameters():
            undo.append(functools.partial(p.requires_grad_, st.requires_grad[n]))
            p.requires_grad_(False)
    else:
        old = (st.active, dict(st.configs), dict(st.kinds), st.version, st.backend,
               {n: p.requires_grad for n, p in model.named_parameters()})

        def restore_state():
            st.active, st.configs, st.kinds, st.version, st.backend = old[0], old[1], old[2], old[3], old[4]
            for _, w in _wrappers(model):
                w.active_adapter, w.backend = st.active, st.backend
            for n, p in model.named_parameters():
                if n in old[5]:
                    p.requires_grad_(old[5][n])
        undo.append(restore_state)
    if isinstance(cfg, PrefixConfig):
        layers, kv_heads, head_dim = geometry
        dev = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") else None
        if _prefix_encoders(model) is None:
            model.add_module(PREFIX_MODULE, nn.ModuleDict())
            undo.append(lambda: model._modules.pop(PREFIX_MODULE, None))
        _prefix_encoders(model)[name] = PrefixEncoder(cfg, layers, kv_heads, head_dim, device=dev)
        undo.append(lambda: _prefix_encoders(model).pop(name, None) if _prefix_encoders(model) is not None else None)
        if st.orig_forward is None:
            had = model.__dict__.get("forward", _MISSING)

            def restore_forward():
                model.__dict__.pop("forward", None)
                if had is not _MISSING:
                    model.__dict__["forward"] = had
                st.orig_forward = st.instance_forward = None
            undo.append(restore_forward)
            st.instance_forward = model.__dict__.get("forward")
            st.orig_forward = model.forward
            model.forward = _prefix_forward(model, st.orig_forward)
    else:
        for path, kind in kinds.items():
            mod = model.get_submodule(path)
            if not isinstance(mod, AdapterLinear):
                wrapper = AdapterLinear(mod)
                wrapper.train(mod.training)  # an eval-mode model stays in eval mode (no dropout)
                wrapper.backend = st.backend
                wrapper.active_adapter = st.active
                _set_submodule(model, path, wrapper)
                st.wrapped.append(path)

                def unwrap(path=path, base=mod):
                    _set_submodule(model, path, base)
                    if path in st.wrapped:
                        st.wrapped.remove(path)
                undo.append(unwrap)
                mod = wrapper
            undo.append(functools.partial(mod.delete_adapter, name))
            mod.add_adapter(name, cfg, kind)
    st.configs[name] = cfg
    st.kinds[name] = kinds
    st.version += 1
    if not first and backend is not None and backend != st.backend:
        set_backend(model, backend)  # the backend is per model: a later patch's choice is not ignored
    if first or st.active is None:
        set_adapter(model, name)
    else:
        _mark_trainable(model, st)
    return st


def _link_shared_inputs(model: nn.Module) -> None:
    """Give sibling wrappers that read one input (``Architecture.shared_input``) a common
    ``SharedInput``; drop stale links. Called whenever the set of wrappers changes."""
    wrappers = list(_wrappers(model))
    for _, w in wrappers:
        w.__dict__.pop("shared_input", None)
    arch = models.architecture_of(model)
    if arch is None or not arch.shared_input:
        return
    by_parent: dict[str, dict[str, AdapterLinear]] = {}
    for path, w in wrappers:
        parent, _, child = path.rpartition(".")
        by_parent.setdefault(parent, {})[child] = w
    for children in by_parent.values():
        for group in arch.shared_input:
            members = [children[c] for c in group if c in children]
            if len(members) >= 2:
                share = SharedInput(members)
                for w in members:
                    w.__dict__["shared_input"] = share


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: run the bare base model); only it trains.
    On a sharded / DDP-wrapped model only the adapter already active may be set."""
    st = _state(model)
    if st is None or name != st.active:
        refuse_adapter_change_if_sharded(model, f"set_adapter(model, {name!r})")
    st = _require_state(model)
    if name is not None and name not in st.configs:
        raise ValueError(f"no adapter named {name!r}; loaded: {list(st.configs)}")
    st.active = name
    for _, w in _wrappers(model):
        w.active_adapter = name
    _mark_trainable(model, st)


def _check_model_backend(backend: str | None) -> None:
    """A model's backend runs its single-adapter forwards too, which have no C++ kernel: "cpp" is
    refused here, before anything changes, rather than by every forward after."""
    dispatch.check_backend_name(backend)
    if backend == "cpp":
        raise ValueError("backend: got 'cpp' for a model; valid: auto, torch, triton, cuda, or None ('cpp' is the "
                         "CPU kernel of mixed-adapter batches only: fa.route(model, names, backend='cpp') or "
                         "serve --backend cpp; 'auto' takes it there on the CPU)")


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Choose the kernel backend of every patched layer (None: FASTADAPTERS_BACKEND or auto)."""
    st = _require_state(model)
    _check_model_backend(backend)
    st.backend = backend
    for _, w in _wrappers(model):
        w.backend = backend


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; removing the last one unpatches the model. Refused on a sharded /
    DDP-wrapped model."""
    refuse_adapter_change_if_sharded(model, f"delete_adapter(model, {name!r})")
    st = _require_state(model)
    if name not in st.configs:
        raise ValueError(f"no adapter named {name!r}; loaded: {list(st.configs)}")
    if len(st.configs) == 1:
        unpatch(model)
        return
    for _, w in _wrappers(model):
        w.delete_adapter(name)
    for path in [p for p in st.wrapped if not model.get_submodule(p).specs]:  # no adapter left here:
        _set_submodule(model, path, model.get_submodule(path).base_layer)  # the original module back
        st.wrapped.remove(path)
    enc = _prefix_encoders(model)
    if enc is not None and name in enc:
        del enc[name]
        if not len(enc):  # the last prefix adapter: original forward back, as unpatch does
            del model._modules[PREFIX_MODULE]
            model.__dict__.pop("forward", None)
            if st.instance_forward is not None:
                model.__dict__["forward"] = st.instance_forward
            st.orig_forward = st.instance_forward = None
    del st.configs[name]
    del st.kinds[name]
    st.version += 1
    _link_shared_inputs(model)
    if st.active == name:
        set_adapter(model, next(iter(st.configs)))


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every adapter and give the original modules back (state dict identical). Refused on a
    sharded / DDP-wrapped model."""
    refuse_adapter_change_if_sharded(model, "unpatch(model)")
    st = _require_state(model)
    for path in sorted(st.wrapped, key=lambda p: -p.count(".")):
        wrapper = model.get_submodule(path)
        wrapper.__dict__.pop("shared_input", None)
        _set_submodule(model, path, wrapper.base_layer)
    if PREFIX_MODULE in model._modules:
        del model._modules[PREFIX_MODULE]
    if st.orig_forward is not None:
        model.__dict__.pop("forward", None)
        if st.instance_forward is not None:  # a forward the instance had before: back in place
            model.__dict__["forward"] = st.instance_forward
    for n, p in model.named_parameters():
        if n in st.requires_grad:
            p.requires_grad_(st.requires_grad[n])
    _unguard_save_pretrained(model, st)
    del model.__dict__["_fastadapters"]
    return model


class TrainableCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {self.percent:.4f}")


def trainable_parameters(model: nn.Module) -> TrainableCount:
    """(trainable, total) parameter counts, as PEFT's ``get_nb_trainable_parameters``; str() prints them."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return TrainableCount(trainable, total)


# ---------------------------------------------------------------------------------------------
# prefix-tuning through the KV cache
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _read_only_cache_class():
    """A ``DynamicCache`` whose ``update`` returns (stored + new) without storing anything.

    Under gradient checkpointing a layer runs twice (forward, then again in backward); a cache that
    grew in the first run would hand the replay P + n more positions. This one stays as filled, so
    both runs see the same keys/values, and the layers may keep it (``_can_checkpoint_with_cache``).
    With ``source`` set (``layer -> (keys, values)``) ``update`` takes the leading keys/values from it,
    computed inside the layer's call, rather than the stored ones (which then only give the lengths):
    reentrant checkpointing replays a layer under its own ``backward`` call, which would free the
    encoder's shared graph after the first layer if every layer read tensors computed once outside.
    """
    from transformers.cache_utils import DynamicCache

    class ReadOnlyPrefixCache(DynamicCache):
        source = None

        def fill(self, key_states, value_states, layer_idx):
            return DynamicCache.update(self, key_states, value_states, layer_idx)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.source is not None:
                keys, values = self.source(layer_idx)
            else:
                keys, values = self.layers[layer_idx].keys, self.layers[layer_idx].values
            return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    return ReadOnlyPrefixCache


def _checkpointing_overrides(model: nn.Module) -> list[tuple[nn.Module, str, Any]] | None:
    """Instance attributes to set for one prefix forward under gradient checkpointing; None: not checkpointing.

    transformers drops the cache in two places under checkpointing: ``GradientCheckpointingLayer``
    (unless the layer's ``_can_checkpoint_with_cache``, read on the instance at call time, is true)
    and, for some families (GPT-2), the base model's loop (``past_key_values if not
    (self.gradient_checkpointing and self.training)``), whose flag only decides that there. So the
    layers get ``_can_checkpoint_with_cache = True`` and the modules above them ``gradient_checkpointing
    = False`` on the instance, for the call only; the layers themselves still checkpoint. A model
    that checkpoints without ``GradientCheckpointingLayer`` (its loop calls the checkpoint function)
    gets a RuntimeError, as does a transformers without ``_can_checkpoint_with_cache``.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - very old transformers
        GradientCheckpointingLayer = None
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and m.training]
    if not on:
        return None
    layers = [m for m in on if GradientCheckpointingLayer is not None and isinstance(m, GradientCheckpointingLayer)]
    others = [m for m in on if m not in layers]
    if not layers or not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        raise RuntimeError("prefix-tuning feeds its prefixes through past_key_values, which this model's gradient "
                           "checkpointing drops (it needs transformers' GradientCheckpointingLayer with "
                           "_can_checkpoint_with_cache); disable gradient checkpointing "
                           "(model.gradient_checkpointing_disable()) to train a prefix adapter")
    return [(m, "_can_checkpoint_with_cache", True) for m in layers] + [(m, "gradient_checkpointing", False)
                                                                        for m in others]


def _transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except Exception:  # pragma: no cover
        return "unknown"


def _prefix_cache_argument(forward, owner: str, class_forward=None) -> str:
    """The name under which ``forward`` takes its KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier releases). A forward with neither is a contract we do not know:
    refused with the version named, rather than run with the prefix silently dropped."""
    params = inspect.signature(forward).parameters
    for name in PREFIX_CACHE_ARGUMENTS:
        if name in params:
            return name
    generic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    if generic and class_forward is not None:  # an instance-level wrapper (accelerate's hooks) that passes
        return _prefix_cache_argument(class_forward, owner)  # everything on: the class's forward decides
    raise RuntimeError(f"prefix-tuning: {owner}.forward under transformers {_transformers_version()} takes its "
                       f"KV cache under none of {PREFIX_CACHE_ARGUMENTS}, so the prefix cannot be passed in; "
                       f"this transformers release is not supported for prefix-tuning (tested: "
                       f"{PREFIX_TESTED_TRANSFORMERS}); install one of those or use another adapter type")


def _prefix_forward(model: nn.Module, orig_forward):
    """Wrap ``orig_forward`` so the active prefix adapter's keys/values lead every layer's cache.

    On a call without a started cache (training, or generate's first step) the per-layer prefixes
    are written into a fresh or empty ``DynamicCache`` that is marked with the prefix length P.
    On every call with a marked cache, P is added to ``cache_position``/``position_ids`` and P
    ones are put before the attention mask, so the model sees P real past positions. Generation
    thereby uses the ordinary Cache API: beams, sampling and left padding need no special case.

    Training under gradient checkpointing uses a read-only cache instead (its ``update`` stores
    nothing, so the backward replay of a layer sees what the forward saw), kept by the layers
    through instance flags set for the call only (``_checkpointing_overrides``); it is not handed back.
    """
    from transformers.cache_utils import DynamicCache

    params = list(inspect.signature(orig_forward).parameters)
    cache_arg = _prefix_cache_argument(orig_forward, type(model).__name__, type(model).forward)
    aliases = [a for a in PREFIX_CACHE_ARGUMENTS if a != cache_arg]

    @functools.wraps(orig_forward)
    def forward(*args, **kwargs):
        st = _state(model)
        enc = _prefix_encoders(model)
        if st is None or enc is None or st.active not in enc:
            return orig_forward(*args, **kwargs)
        for i, a in enumerate(args):
            if params[i] in kwargs:
                raise TypeError(f"forward got multiple values for argument {params[i]!r}")
            kwargs[params[i]] = a
        for alias in aliases:  # the other release's name for the cache (a caller's habit) -> this one's
            if alias in kwargs and alias not in params:
                value = kwargs.pop(alias)
                if value is not None and kwargs.get(cache_arg) is not None:
                    raise TypeError(f"forward got both {cache_arg!r} and {alias!r}; pass the cache once")
                if value is not None:
                    kwargs[cache_arg] = value
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("prefix-tuning needs input_ids or inputs_embeds")
        batch, length = ref.shape[0], ref.shape[1]
        encoder = enc[st.active]
        overrides = _checkpointing_overrides(model)
        p = encoder.config.num_virtual_tokens
        cache = kwargs.get(cache_arg)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise ValueError(f"prefix-tuning needs a transformers Cache object as {cache_arg} "
                             f"(e.g. DynamicCache), got {type(cache).__name__}")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"prefix-tuning cannot use a {type(cache).__name__} (a fixed-size cache, e.g. "
                             "generate(cache_implementation='static')): it has no room for the prefix and "
                             "generate builds its masks without it; use the default dynamic cache")
        marked = cache is not None and getattr(cache, "_fa_prefix_len", None) is not None
        if not marked and cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{cache_arg} holds a cache not started by this prefix-tuned model; "
                             "pass None or an empty cache")
        own_cache = None  # a cache made here for a caller that asked for none: not handed back
        if overrides is not None:  # checkpointed training: a read-only copy, never handed back
            own_cache = _read_only_cache_class()()
            if marked:  # the caller's prefix + earlier tokens, read as they are
                for layer, kv in enumerate(cache.layers):
                    own_cache.fill(kv.keys, kv.values, layer)
                own_cache._fa_prefix_len = cache._fa_prefix_len
            cache = own_cache
            kwargs[cache_arg] = cache
        if not marked:
            if cache is None:
                cache = DynamicCache()
                use_cache = kwargs.get("use_cache")
                if use_cache is None:
                    use_cache = getattr(getattr(model, "config", None), "use_cache", True)
                if not use_cache:
                    own_cache = cache
            dtype = model.get_input_embeddings().weight.dtype
            if cache is own_cache and overrides is not None:  # read-only: lengths from a detached copy,
                with torch.no_grad():  # the keys/values themselves made in each layer's call
                    for layer, (k, v) in enumerate(encoder(batch, dtype)):
                        cache.fill(k, v, layer)
                cache.source = lambda layer: encoder(batch, dtype)[layer]
            else:
                for layer, (k, v) in enumerate(encoder(batch, dtype)):
                    cache.update(k, v, layer)
            cache._fa_prefix_len = p
            kwargs[cache_arg] = cache
        p = cache._fa_prefix_len
        for key in ("cache_position", "position_ids"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + p
        mask = kwargs.get("attention_mask")
        past = cache.get_seq_length()  # prefix + earlier real tokens
        if mask is None:
            mask = torch.ones(batch, past + length, dtype=torch.long, device=ref.device)
        elif mask.dim() == 2:
            mask = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        else:
            raise ValueError(f"prefix-tuning supports 2-D attention masks, got shape {tuple(mask.shape)}")
        kwargs["attention_mask"] = mask
        saved = []
        try:
            for mod, attr, value in overrides or ():
                saved.append((mod, attr, mod.__dict__.get(attr, _MISSING)))
                setattr(mod, attr, value)
            out = orig_forward(**kwargs)
        finally:
            for mod, attr, old in reversed(saved):
                if old is _MISSING:
                    mod.__dict__.pop(attr, None)
                else:
                    setattr(mod, attr, old)
        if overrides is None and cache.get_seq_length() != past + length:  # the model read a cache other
            # than ours (or none): its output ignores the prefix. Never hand that back as a result.
            raise RuntimeError(
                f"prefix-tuning: {type(model).__name__}.forward under transformers {_transformers_version()} "
                f"did not use the cache passed as {cache_arg!r} (it holds {cache.get_seq_length()} positions, "
                f"expected {past + length}), so the prefix was ignored; this release changed the cache "
                f"contract. Tested releases: {PREFIX_TESTED_TRANSFORMERS}; install one of those")
        if own_cache is not None:  # use_cache=False: returning the prefix cache would make generate
            # feed it back with the whole sequence again (prefix + tokens counted twice)
            if isinstance(out, tuple) and not hasattr(out, "items"):
                out = tuple(o for o in out if o is not own_cache)
            elif any(v is own_cache for v in out.values()):  # rebuilt: a ModelOutput keeps keys set to None
                out = type(out)(**{k: v for k, v in out.items() if v is not own_cache})
        return out

    return forward


_MISSING = object()
# the names a model's forward takes its KV cache under, newest first, and the releases CI tests
PREFIX_CACHE_ARGUMENTS = ("cache", "past_key_values")
PREFIX_TESTED_TRANSFORMERS = "5.17 to 5.25"
