"""The adapter store of a patched model: every named adapter's weights stacked per layer, in slots.

For each ``AdapterLinear`` the store keeps up to three phases of *tables* (see ``routing.py``),
one table per rank bucket in each:

    pre       mh adapters           x' = x + f(x)        down (S_b, b, K)  up (S_b, K, b)
    post_in   lora + parallel       y  = y + f(x)        down (S_b, b, K)  up (S_b, N, b)
    post_out  output adapters       y  = h + f(h)        down (S_b, b, N)  up (S_b, N, b)

with ``sizes`` / ``scales`` / ``act_ids`` (S_b,) beside them (LoRA: down = A, up = B, act 0, scale
alpha/r). Rank buckets: an adapter of rank (or bottleneck) r lives in bucket b = the next power of
two >= r (its largest size over all layers), so its slot is padded to b, not to the largest rank
loaded: one rank-256 adapter adds rank-256 tables of its own and leaves the rank-8 tables as they
were. A routed layer runs one multi-adapter call per bucket. Slots are (bucket, slot) and global
per model: slot s of bucket b holds the same adapter in every table of every layer, so the per-row
metadata is computed once per forward and bucket; a layer (or phase) that lacks that adapter has
size 0 there. Compute does not pad either (kernels loop to ``sizes[s]``).

Dtype: the stacks take the base layer's dtype when it is fp16/bf16 (half the bytes a decode step
reads, and 16-bit tensor-core dots), else the adapters' own (fp32: routed rows then equal
``set_adapter`` rows to fp32 rounding); ``configure(model, dtype=...)`` overrides.

Slots: with ``max_slots`` unset every adapter has a slot (resident). With ``max_slots`` = N, at most
N adapters are resident at once: each bucket's tables have min(N, adapters in the bucket) slots,
each adapter's weights are copied once into a CPU-side store (pinned memory when the model is on
CUDA) and slots are filled on demand, evicting the least recently used adapter that the current
batch does not need (from the same bucket when that bucket's tables are full).

Updates are incremental: ``sync`` compares the adapter set and each adapter's weight versions with
the last sync; an added adapter is copied into a free slot of its bucket (a full bucket's tables
are reallocated at twice the slots first, moving that bucket's slots once: amortized O(1) per
load), a removed one frees its slot (a bucket's last one frees its tables), and one whose weights
were edited in place is copied again. Other adapters' slots are not touched, so what a load costs
does not grow with the number loaded (``bytes_copied``, ``tables_grown`` and ``swaps`` count it).
A device or dtype change rebuilds everything. ``route`` checks all of that on entry; each layer call
checks the cheap adapter-set version counter, so loading or removing adapters between forwards
works without re-patching.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import PrefixConfig
from ..layers import AdapterLinear
from ..ops.bottleneck import ACT_IDS
from ..patching import _require_state, _state, _wrappers

_LAYOUTS = itertools.count(1)  # every table layout of every store gets its own number

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


def bucket_of(size: int) -> int:
    """The rank bucket of an adapter of ``size`` (rank or bottleneck): the next power of two."""
    return 1 << max(0, int(size) - 1).bit_length()


@dataclass
class Table:
    """One phase of one layer, one rank bucket: stacked weights of that bucket's adapters, padded
    to the bucket's rank (not to the largest rank loaded)."""

    down: torch.Tensor  # (S_b, R_b, d_in)
    up: torch.Tensor  # (S_b, d_out, R_b)
    sizes: torch.Tensor  # (S_b,) int32, device
    scales: torch.Tensor  # (S_b,) fp32, device
    act_ids: torch.Tensor  # (S_b,) int32, device
    sizes_host: torch.Tensor  # (S_b,) int32, CPU copy (the torch path reads it without a sync)
    act_host: torch.Tensor  # (S_b,) int32, CPU copy
    members: dict[str, _Member] = field(default_factory=dict)

    @staticmethod
    def empty(slots: int, r: int, d_in: int, d_out: int, device, dtype) -> "Table":
        # on the CPU ``up`` is stored as (S, R, d_out) and exposed transposed, (S, d_out, R) with
        # strides (R * d_out, 1, d_out): the C++ kernel's up-projection then runs over contiguous
        # outputs (ops/multi.py, cpp backend); the GPU kernels read the contiguous (S, d_out, R)
        up = (torch.zeros(slots, r, d_out, device=device, dtype=dtype).transpose(1, 2)
              if torch.device(device).type == "cpu" else torch.zeros(slots, d_out, r, device=device, dtype=dtype))
        return Table(down=torch.zeros(slots, r, d_in, device=device, dtype=dtype),
                     up=up,
                     sizes=torch.zeros(slots, device=device, dtype=torch.int32),
                     scales=torch.zeros(slots, device=device, dtype=torch.float32),
                     act_ids=torch.zeros(slots, device=device, dtype=torch.int32),
                     sizes_host=torch.zeros(slots, dtype=torch.int32),
                     act_host=torch.zeros(slots, dtype=torch.int32))

    @property
    def slots(self) -> int:
        return int(self.down.shape[0])

    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes

    def grow(self, slots: int) -> int:
        """Reallocate with ``slots`` slots, keeping the filled ones; returns the bytes copied."""
        old = self.slots
        big = Table.empty(slots, self.down.shape[1], self.down.shape[2], self.up.shape[1], self.down.device,
                          self.down.dtype)
        for f in ("down", "up", "sizes", "scales", "act_ids", "sizes_host", "act_host"):
            getattr(big, f)[:old].copy_(getattr(self, f))
            setattr(self, f, getattr(big, f))
        return self.nbytes() * old // slots

    def args(self):
        return self.down, self.up, self.sizes, self.scales, self.act_ids

    def clear_slot(self, slot: int) -> None:
        self.sizes[slot] = 0
        self.sizes_host[slot] = 0

    def fill_slot(self, slot: int, name: str) -> int:
        """Copy ``name``'s weights into ``slot``; returns the bytes copied."""
        mem = self.members.get(name)
        if mem is None:
            self.clear_slot(slot)
            return 0
        r = mem.size
        if r < self.down.shape[1]:  # the padding of a slot a larger adapter held before
            self.down[slot, r:].zero_()
            self.up[slot, :, r:].zero_()
        self.down[slot, :r].copy_(mem.down, non_blocking=True)
        self.up[slot, :, :r].copy_(mem.up, non_blocking=True)
        self.sizes[slot] = r
        self.scales[slot] = mem.scale
        self.act_ids[slot] = mem.act_id
        self.sizes_host[slot] = r
        self.act_host[slot] = mem.act_id
        return mem.down.numel() * self.down.element_size() + mem.up.numel() * self.up.element_size()


@dataclass
class LayerTables:
    """One layer's tables: per phase, one ``Table`` per rank bucket ({bucket: Table})."""

    pre: dict = field(default_factory=dict)
    post_in: dict = field(default_factory=dict)
    post_out: dict = field(default_factory=dict)

    def tables(self):
        return [t for d in (self.pre, self.post_in, self.post_out) for t in d.values()]


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
    """Stacked adapter weights of one patched model, per rank bucket, with LRU device slots (see the
    module docstring)."""

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
        self._where = None
        self._reset()

    def _reset(self) -> None:
        self.names: list[str] = []
        self.layers: dict[int, LayerTables] = {}
        self.bucket: dict[str, int] = {}  # adapter -> its rank bucket
        self.capacity: dict[int, int] = {}  # bucket -> slots in each of its tables
        self.slot_of: dict[str, tuple[int, int]] = {}  # resident adapter -> (bucket, slot in the bucket)
        self._wvers: dict[str, tuple] = {}  # adapter -> its weights' (version, data pointer)s
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self.swaps = 0  # slot fills (tests and benchmarks read it)
        self.bytes_copied = 0  # adapter bytes copied into slots, plus table contents moved by growth
        self.tables_grown = 0  # tables reallocated (created or grown)
        # changes whenever a table tensor is allocated, reallocated or dropped, never repeats (a
        # captured CUDA graph holds the tables' memory: cuda_graphs.py recaptures when it moves)
        self.layout = next(_LAYOUTS)

    @property
    def num_slots(self) -> int:
        """How many adapters can be resident at once."""
        n = len(self.names)
        return max(1, min(self.max_slots, n) if self.max_slots else n)

    @property
    def buckets(self) -> list[int]:
        return sorted(self.capacity)

    def nbytes(self, bucket: int | None = None) -> int:
        """Device bytes of the stacked weights (of one bucket, or all)."""
        return sum(t.nbytes() for lt in self.layers.values() for d in (lt.pre, lt.post_in, lt.post_out)
                   for b, t in d.items() if bucket is None or b == bucket)

    # -- staleness ---------------------------------------------------------------------------
    def wrappers(self) -> list[AdapterLinear]:
        """The model's adapter wrappers, walked once per adapter-set version (not per forward)."""
        st = _require_state(self.model)
        cached = self.__dict__.get("_wrappers_cache")
        if cached is None or cached[0] != st.version:
            cached = self._wrappers_cache = (st.version, [w for _, w in _wrappers(self.model)])
        return cached[1]

    def _weight_versions(self, names=None) -> dict[str, tuple]:
        """Per adapter, the (version counter, data pointer) of each of its weights (``names``: only
        those adapters). The counter moves with in-place edits; the pointer with a new tensor put
        in place without one (``p.data = t``, a new Parameter), which keeps or restarts the counter."""
        vers: dict[str, list] = {}
        for w in self.wrappers():
            for name, p in (_named_params(w) if names is None else _named_params_of(w, names)):
                vers.setdefault(name, []).append((p._version, p.data_ptr()))
        return {name: tuple(v) for name, v in vers.items()}

    def _added(self) -> list[str]:
        st = _require_state(self.model)
        return [n for n, c in st.configs.items() if not isinstance(c, PrefixConfig) and n not in self.bucket]

    def fingerprint(self):
        """Everything the tables depend on: adapter set, weight versions, devices and dtypes."""
        st = _require_state(self.model)
        where = frozenset((str(w.base_layer.weight.device), w.base_layer.weight.dtype) for w in self.wrappers())
        return st.version, tuple(sorted(self._weight_versions().items())), where

    def _quick(self):
        """O(1) staleness: the adapter-set version and where the first wrapper's base weight lives."""
        st = _require_state(self.model)
        ws = self.wrappers()
        w = ws[0].base_layer.weight if ws else None
        return st.version, None if w is None else (str(w.device), w.dtype)

    def sync(self, weights: bool = True) -> bool:
        """Bring the tables up to date; True if anything changed.

        Incremental: an adapter added is copied into its bucket's tables (a bucket's tables grow by
        doubling when full), one removed frees its slot, one whose weights changed in place is
        copied again; the other adapters' slots are not touched. A device or dtype change (or a new
        store) rebuilds everything.

        ``weights=False`` (the serving engine's per-step check): only the adapter-set version
        counter and the model's device/dtype are compared, O(1) whatever the number of adapters;
        in-place edits of loaded adapter weights are then picked up by the next full ``sync()``
        (a new ``route``), not mid-stream."""
        quick = self._quick()
        if not weights and self._fingerprint is not None and self.__dict__.get("_quick_fp") == quick:
            return False
        if not weights and self._fingerprint is not None and self.__dict__.get("_quick_fp", (0, 0))[1] == quick[1]:
            # the adapter set changed (a load or an unload between engine steps): copy the added
            # ones, free the removed ones, reading only the added adapters' version counters --
            # O(what changed), not a walk of every loaded adapter's weights
            with torch.no_grad(), torch.inference_mode(False):
                self._update(self._weight_versions(self._added()), only_set=True)
            self._quick_fp = quick
            return True
        fp = self.fingerprint()
        if fp == self._fingerprint:
            self._quick_fp = self._quick()
            return False
        with torch.no_grad(), torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
            if self._fingerprint is None or fp[2] != self._fingerprint[2]:
                self._reset()
            self._update(dict(fp[1]))
        self._fingerprint = fp
        self._quick_fp = self._quick()
        return True

    def rebuild(self) -> None:
        """Drop every table and build them again."""
        self._fingerprint = None
        self.sync()

    # -- building ----------------------------------------------------------------------------
    def _update(self, wvers: dict[str, tuple], only_set: bool = False) -> None:
        """Apply what changed; ``only_set``: ``wvers`` covers the added adapters only (the others'
        weights are taken as unchanged until the next full sync)."""
        st = _require_state(self.model)
        names = [n for n, c in st.configs.items() if not isinstance(c, PrefixConfig)]
        if only_set:
            wvers = {**self._wvers, **wvers}
        gone = [n for n in self.names if n not in names or self._wvers.get(n) != wvers.get(n)]
        for n in gone:
            self._remove(n)
        for n in names:
            if n not in self.bucket:
                self._add(n)
        self.names = names
        self._wvers = {n: wvers.get(n, ()) for n in names}
        self.version = st.version

    def _remove(self, name: str) -> None:
        b = self.bucket.pop(name)
        where = self.slot_of.pop(name, None)
        self._lru.pop(name, None)
        for lt in self.layers.values():
            for d in (lt.pre, lt.post_in, lt.post_out):
                t = d.get(b)
                if t is not None:
                    t.members.pop(name, None)
                    if where is not None:
                        t.clear_slot(where[1])
        self.names = [n for n in self.names if n != name]
        if b not in self.bucket.values():  # the bucket's last adapter: free its tables
            del self.capacity[b]
            self.layout = next(_LAYOUTS)
            for lt in self.layers.values():
                for d in (lt.pre, lt.post_in, lt.post_out):
                    d.pop(b, None)

    def _add(self, name: str) -> None:
        keep_host = self.max_slots is not None
        members = []
        for w in self.wrappers():
            spec = w.specs.get(name)
            if spec is not None:
                members.append((w, KIND_PHASE[spec.kind], _member(w, name, keep_host)))
        b = bucket_of(max([m.size for _, _, m in members], default=1))
        self.bucket[name] = b
        self.names.append(name)
        n_b = sum(1 for v in self.bucket.values() if v == b)
        want = n_b if self.max_slots is None else min(self.max_slots, n_b)
        cap = self.capacity.get(b, 0)
        if want > cap:  # grow this bucket's tables (doubling: amortized O(1) copies per load)
            cap = max(want, min(2 * cap, self.max_slots or 2 * cap))
            self.capacity[b] = cap
            for lt in self.layers.values():
                for d in (lt.pre, lt.post_in, lt.post_out):
                    t = d.get(b)
                    if t is not None:
                        self.bytes_copied += t.grow(cap)
                        self.tables_grown += 1
                        self.layout = next(_LAYOUTS)
        for w, phase, m in members:
            lt = self.layers.setdefault(id(w), LayerTables())
            d = getattr(lt, phase)
            t = d.get(b)
            if t is None:
                base = w.base_layer.weight
                half = base.dtype in (torch.float16, torch.bfloat16)
                dtype = self.dtype or (base.dtype if half else m.down.dtype)
                t = d[b] = Table.empty(cap, b, m.down.shape[1], m.up.shape[0], base.device, dtype)
                self.tables_grown += 1
                self.layout = next(_LAYOUTS)
            t.members[name] = m
        if self.max_slots is None:  # resident: every adapter has a slot for good
            used = {s for n, (bb, s) in self.slot_of.items() if bb == b}
            self._fill(name, (b, next(s for s in range(cap) if s not in used)))

    def _fill(self, name: str, where: tuple[int, int]) -> None:
        b, slot = where
        with torch.no_grad(), torch.inference_mode(False):
            for lt in self.layers.values():
                for d in (lt.pre, lt.post_in, lt.post_out):
                    t = d.get(b)
                    if t is not None:
                        self.bytes_copied += t.fill_slot(slot, name)
        self.slot_of[name] = where
        self._lru[name] = None
        self.swaps += 1

    # -- slots -------------------------------------------------------------------------------
    def acquire(self, names) -> dict[str, tuple[int, int]]:
        """Make every adapter in ``names`` resident (LRU eviction of others); {name: (bucket, slot)}."""
        need = list(dict.fromkeys(n for n in names))
        unknown = [n for n in need if n not in self.bucket]
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
            b = self.bucket[name]
            used = {s for bb, s in self.slot_of.values() if bb == b}
            free = [s for s in range(self.capacity[b]) if s not in used]
            if free and len(self.slot_of) < self.num_slots:
                where = (b, free[0])
            else:  # evict: from this bucket when it is full, else the least recently used anywhere
                victim = next(v for v in self._lru if v not in needed and (free or self.bucket[v] == b))
                old = self.slot_of.pop(victim)
                del self._lru[victim]
                where = old if old[0] == b else (b, free[0])
            self._fill(name, where)
        for name in need:
            self._lru.move_to_end(name)
        return {n: self.slot_of[n] for n in need}

    def tables(self, layer: AdapterLinear) -> LayerTables | None:
        return self.layers.get(id(layer))


def _named_params(w: AdapterLinear):
    for container in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
        for name, m in container.items():
            yield name, m.weight
    yield from w.adapter_scaling.items()


def _named_params_of(w: AdapterLinear, names):
    for container in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
        for name in names:
            m = container[name] if name in container else None
            if m is not None:
                yield name, m.weight
    for name in names:
        if name in w.adapter_scaling:
            yield name, w.adapter_scaling[name]


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
