"""The adapter store of a patched model: every named adapter's weights stacked per layer, in slots.

For each ``AdapterLinear`` the store keeps up to three *tables*, one per phase of the routed
forward (see ``routing.py``):

    pre       mh adapters           x' = x + f(x)        down (S, R, K)  up (S, K, R)
    post_in   lora + parallel       y  = y + f(x)        down (S, R, K)  up (S, N, R)
    post_out  output adapters       y  = h + f(h)        down (S, R, N)  up (S, N, R)

with ``sizes`` / ``scales`` / ``act_ids`` (S,) beside them (LoRA: down = A, up = B, act 0, scale
alpha/r). Slot ids are global per model: slot s holds the same adapter in every table of every
layer, so the per-row metadata is computed once per forward; a layer (or phase) that lacks that
adapter has size 0 in slot s. R is the largest size any adapter has in that table: storage pads,
compute does not (kernels loop to ``sizes[s]``).

Dtype: the stacks take the base layer's dtype when it is fp16/bf16 (half the bytes a decode step
reads, and 16-bit tensor-core dots), else the adapters' own (fp32: routed rows then equal
``set_adapter`` rows to fp32 rounding); ``configure(model, dtype=...)`` overrides.

Slots: with ``max_slots`` unset every adapter has a slot (resident). With ``max_slots`` below the
number of adapters, each adapter's weights are copied once into a CPU-side store (pinned memory
when the model is on CUDA) and the slots are filled on demand, evicting the least recently used
adapter that the current batch does not need.

Staleness: the store rebuilds lazily when the model's adapters change (``PatchState.version``,
bumped by ``fa.patch(name=...)``, ``fa.load_adapter`` and ``fa.delete_adapter``), when adapter
weights are modified in place (their tensors' version counters), or when the model moves device
or dtype. ``route`` checks all of that on entry; each layer call checks the cheap version counter,
so loading or removing adapters between forwards works without re-patching.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import PrefixConfig
from ..layers import AdapterLinear
from ..ops.bottleneck import ACT_IDS
from ..patching import _require_state, _state, _wrappers

PHASES = ("pre", "post_in", "post_out")
KIND_PHASE = {"mh": "pre", "lora": "post_in", "parallel": "post_in", "output": "post_out"}

__all__ = ["AdapterStore", "get_store", "configure", "PHASES", "KIND_PHASE"]


@dataclass
class _Member:
    """One adapter's weights in one table (unpadded; the params themselves or CPU copies)."""

    down: torch.Tensor  # (r, d_in)
    up: torch.Tensor  # (d_out, r)
    size: int
    scale: float
    act_id: int


@dataclass
class Table:
    """One phase of one layer: stacked, padded weights of the adapters in the device slots."""

    down: torch.Tensor  # (S, R, d_in)
    up: torch.Tensor  # (S, d_out, R)
    sizes: torch.Tensor  # (S,) int32, device
    scales: torch.Tensor  # (S,) fp32, device
    act_ids: torch.Tensor  # (S,) int32, device
    sizes_host: torch.Tensor  # (S,) int32, CPU copy (the torch path reads it without a sync)
    act_host: torch.Tensor  # (S,) int32, CPU copy
    members: dict[str, _Member] = field(default_factory=dict)

    def args(self):
        return self.down, self.up, self.sizes, self.scales, self.act_ids

    def clear_slot(self, slot: int) -> None:
        self.sizes[slot] = 0
        self.sizes_host[slot] = 0

    def fill_slot(self, slot: int, name: str) -> None:
        mem = self.members.get(name)
        if mem is None:
            self.clear_slot(slot)
            return
        r = mem.size
        self.down[slot].zero_()
        self.up[slot].zero_()
        self.down[slot, :r].copy_(mem.down, non_blocking=True)
        self.up[slot, :, :r].copy_(mem.up, non_blocking=True)
        self.sizes[slot] = r
        self.scales[slot] = mem.scale
        self.act_ids[slot] = mem.act_id
        self.sizes_host[slot] = r
        self.act_host[slot] = mem.act_id


@dataclass
class LayerTables:
    pre: Table | None = None
    post_in: Table | None = None
    post_out: Table | None = None

    def tables(self):
        return [t for t in (self.pre, self.post_in, self.post_out) if t is not None]


def _member(w: AdapterLinear, name: str, keep_host: bool) -> _Member:
    spec = w.specs[name]
    if spec.kind == "lora":
        down, up = w.lora_A[name].weight, w.lora_B[name].weight
        scale, act = float(spec.scaling), 0
    else:
        down, up = w.adapter_down[name].weight, w.adapter_up[name].weight
        scale = w.scaling_of(name)  # a learned scalar is read here (rebuilds track its version)
        scale = float(scale.detach() if isinstance(scale, torch.Tensor) else scale)
        act = ACT_IDS[spec.config.non_linearity]
    down, up = down.detach(), up.detach()
    if keep_host:  # the CPU-side store that device slots are filled from
        pin = down.device.type == "cuda"
        down = down.to("cpu", copy=True)
        up = up.to("cpu", copy=True)
        if pin:
            down, up = down.pin_memory(), up.pin_memory()
    return _Member(down, up, int(down.shape[0]), scale, act)


class AdapterStore:
    """Stacked adapter weights of one patched model, with LRU device slots (see the module docstring)."""

    def __init__(self, model: nn.Module, max_slots: int | None = None, dtype: torch.dtype | None = None):
        if max_slots is not None and (isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1):
            raise ValueError(f"max_slots: got {max_slots!r}; valid: None (one slot per adapter) or an integer >= 1")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype: got {dtype!r}; valid: None (the adapters' own dtype), float32, float16, bfloat16")
        self.model = model
        self.max_slots = max_slots
        self.dtype = dtype
        self.version = -1  # PatchState.version this store was built for
        self._fingerprint = None
        self.names: list[str] = []
        self.num_slots = 0
        self.layers: dict[int, LayerTables] = {}
        self.slot_of: dict[str, int] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self.swaps = 0  # slot fills since the last rebuild (tests and benchmarks read it)

    # -- staleness ---------------------------------------------------------------------------
    def wrappers(self) -> list[AdapterLinear]:
        """The model's adapter wrappers, walked once per adapter-set version (not per forward)."""
        st = _require_state(self.model)
        cached = self.__dict__.get("_wrappers_cache")
        if cached is None or cached[0] != st.version:
            cached = self._wrappers_cache = (st.version, [w for _, w in _wrappers(self.model)])
        return cached[1]

    def fingerprint(self):
        """Everything a rebuild depends on: adapter set, weight versions, devices and dtypes."""
        st = _require_state(self.model)
        vers, where = 0, set()
        for w in self.wrappers():
            for p in _params(w):
                vers += p._version
            where.add((str(w.base_layer.weight.device), w.base_layer.weight.dtype))
        return st.version, vers, frozenset(where)

    def _quick(self):
        """O(1) staleness: the adapter-set version and where the first wrapper's base weight lives."""
        st = _require_state(self.model)
        ws = self.wrappers()
        w = ws[0].base_layer.weight if ws else None
        return st.version, None if w is None else (str(w.device), w.dtype)

    def sync(self, weights: bool = True) -> bool:
        """Rebuild if anything changed since the last build; True if it rebuilt.

        ``weights=False`` (the serving engine's per-step check): only the adapter-set version
        counter and the model's device/dtype are compared, O(1) whatever the number of adapters;
        in-place edits of loaded adapter weights are then picked up by the next full ``sync()``
        (a new ``route``), not mid-stream."""
        if not weights and self._fingerprint is not None and self.__dict__.get("_quick_fp") == self._quick():
            return False
        fp = self.fingerprint()
        if fp == self._fingerprint:
            self._quick_fp = self._quick()
            return False
        self.rebuild()
        self._fingerprint = fp
        self._quick_fp = self._quick()
        return True

    # -- building ----------------------------------------------------------------------------
    def rebuild(self) -> None:
        with torch.no_grad(), torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
            self._rebuild()

    def _rebuild(self) -> None:
        st = _require_state(self.model)
        self.names = [n for n, c in st.configs.items() if not isinstance(c, PrefixConfig)]
        n_ad = len(self.names)
        self.num_slots = max(1, min(self.max_slots, n_ad) if self.max_slots else n_ad)
        keep_host = self.num_slots < n_ad
        self.layers = {}
        for _, w in _wrappers(self.model):
            lt = LayerTables()
            by_phase: dict[str, dict[str, _Member]] = {}
            for name in self.names:
                spec = w.specs.get(name)
                if spec is None:
                    continue
                by_phase.setdefault(KIND_PHASE[spec.kind], {})[name] = _member(w, name, keep_host)
            dev = w.base_layer.weight.device
            for phase, members in by_phase.items():
                any_m = next(iter(members.values()))
                base_dtype = w.base_layer.weight.dtype
                half = base_dtype in (torch.float16, torch.bfloat16)
                dtype = self.dtype or (base_dtype if half else any_m.down.dtype)
                r = max(m.size for m in members.values())
                d_in, d_out = any_m.down.shape[1], any_m.up.shape[0]
                s = self.num_slots
                table = Table(
                    down=torch.zeros(s, r, d_in, device=dev, dtype=dtype),
                    up=torch.zeros(s, d_out, r, device=dev, dtype=dtype),
                    sizes=torch.zeros(s, device=dev, dtype=torch.int32),
                    scales=torch.zeros(s, device=dev, dtype=torch.float32),
                    act_ids=torch.zeros(s, device=dev, dtype=torch.int32),
                    sizes_host=torch.zeros(s, dtype=torch.int32),
                    act_host=torch.zeros(s, dtype=torch.int32),
                    members=members,
                )
                setattr(lt, phase, table)
            self.layers[id(w)] = lt
        self.slot_of = {}
        self._lru = OrderedDict()
        self.swaps = 0
        if not keep_host:  # resident: adapter i lives in slot i for good
            for i, name in enumerate(self.names):
                self._fill(name, i)
        self.version = st.version

    def _fill(self, name: str, slot: int) -> None:
        with torch.no_grad(), torch.inference_mode(False):
            for lt in self.layers.values():
                for t in lt.tables():
                    t.fill_slot(slot, name)
        self.slot_of[name] = slot
        self._lru[name] = None
        self.swaps += 1

    # -- slots -------------------------------------------------------------------------------
    def acquire(self, names) -> dict[str, int]:
        """Make every adapter in ``names`` resident (LRU eviction of others); {name: slot}."""
        need = list(dict.fromkeys(n for n in names))
        unknown = [n for n in need if n not in self.names]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r} in the store; loaded: {self.names}")
        if len(need) > self.num_slots:
            raise ValueError(f"this batch uses {len(need)} distinct adapters but the store has {self.num_slots} "
                             "device slots; raise max_slots (fastadapters.serving.configure(model, max_slots=...)) "
                             "or split the batch")
        needed = set(need)
        for name in need:
            if name in self.slot_of:
                continue
            used = set(self.slot_of.values())
            free = [s for s in range(self.num_slots) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(v for v in self._lru if v not in needed)
                slot = self.slot_of.pop(victim)
                del self._lru[victim]
            self._fill(name, slot)
        for name in need:
            self._lru.move_to_end(name)
        return {n: self.slot_of[n] for n in need}

    def tables(self, layer: AdapterLinear) -> LayerTables | None:
        return self.layers.get(id(layer))


def _params(w: AdapterLinear):
    for container in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
        for m in container.values():
            yield m.weight
    yield from w.adapter_scaling.values()


def get_store(model: nn.Module) -> AdapterStore:
    """The model's store (created on first use; it lives in the model's patch state)."""
    st = _require_state(model)
    store = st.__dict__.get("serving_store")
    if store is None or store.model is not model:
        store = AdapterStore(model)
        st.__dict__["serving_store"] = store
    return store


def configure(model: nn.Module, max_slots: int | None = None, dtype: torch.dtype | None = None) -> AdapterStore:
    """Set the number of device slots (None: one per adapter) and the stacked weights' dtype (None:
    the base model's dtype when it is fp16/bf16, as serving systems store LoRA weights, else the
    adapters' own fp32); the store rebuilds on the next ``route``."""
    if _state(model) is None:
        raise ValueError("this model has no fastadapters adapters; call fastadapters.patch(model, ...) first")
    store = AdapterStore(model, max_slots=max_slots, dtype=dtype)
    _require_state(model).__dict__["serving_store"] = store
    return store
