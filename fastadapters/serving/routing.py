"""Per-row adapter routing: ``with fa.route(model, names): model(...)`` runs row i with ``names[i]``.

    with fa.route(model, ["math", None, "chat", "math"]):      # None / "__base__": the bare base model
        logits = model(input_ids).logits
        tokens = model.generate(input_ids, max_new_tokens=16)

On entry the names are checked against the loaded adapters (an unknown name fails before any
compute, listing the loaded ones), the adapter store is synced (rebuilt if adapters were added,
removed or changed) and the batch's adapters are made resident in device slots. Every
``AdapterLinear`` then forwards through ``Router.forward`` in three phases, each one
``fastadapters.ops.multi.multi_adapter`` call over the layer's stacked tables::

    x' = multi(x, x,  pre)        # mh (Houlsby) adapters: x + f(x); other rows keep x
    y  = base(x')                 # the frozen base linear, all rows in one GEMM
    y  = multi(y, x', post_in)    # LoRA and parallel adapters: y + f(x)
    y  = multi(y, y,  post_out)   # output (Houlsby / Pfeiffer) adapters: h + f(h)

mh rows feed x + f(x) to the LoRA/parallel phase too, exactly as LLM-Adapters' mh placement
(a linear carries one adapter per row, so this only matters for the row's own adapter). The
per-row metadata (slot per token, rows sorted by slot, tiles) is built once per input shape, so
one forward pays for it once and every layer and phase shares it. On the CPU, for inference, each
layer phase is one call of the C++ kernel over all its rank buckets, with arguments prepared once
per layer and input shape (``Router._fast_entry``). Layers see (B, T, K) inputs, or
(B*T, K) with each row's tokens adjacent; a layer that permutes tokens (mixture-of-experts
dispatch) is not supported.

Generation: ``model.generate`` inside ``route`` works; when generate expands the batch
(``num_beams`` / ``num_return_sequences``, each row's copies adjacent) the names are expanded the
same way. Outside ``generate`` the batch must have exactly ``len(names)`` rows. Routing is for
inference: adapter dropout is not applied and no gradient reaches the adapter weights (the store
holds copies). A prefix-tuning adapter cannot be routed per row; one that is active is switched off
inside ``route``.

Packed batches (the serving engine): ``route(model, names, lengths=[5, 1, 1])`` routes one row
that holds several requests' tokens back to back: ``names[i]`` covers the next ``lengths[i]``
tokens. A (len(names), K) input -- one token per segment, e.g. each request's last hidden state
gathered for the LM head -- is routed one name per row.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch
import torch.nn as nn

from ..config import PrefixConfig
from ..layers import AdapterLinear
from ..ops import dispatch
from ..ops.multi import OP as MULTI_OP, cpp_gemm_min_rows, SEGMENT_BLOCK_M, MultiPlan, build_plan, multi_adapter
from ..patching import RESERVED_NAMES, _state, _wrappers
from .store import get_store

BASE = RESERVED_NAMES[0]  # "__base__"

__all__ = ["route", "Router", "BASE"]


def _batch_of(args, kwargs) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[0])
    return None


class Router:
    """The routing state ``AdapterLinear.forward`` calls into while ``route`` is active."""

    def __init__(self, model: nn.Module, names: list[str | None], backend: str | None = None,
                 lengths: list[int] | None = None):
        self.model = model
        self.lengths = None if lengths is None else [int(n) for n in lengths]  # packed segments
        self.backend = backend  # None: each layer's own (fa.set_backend / FASTADAPTERS_BACKEND)
        self.state = _state(model)
        self.store = get_store(model)
        self.names = list(names)
        self.expand = 1  # rows per name: > 1 inside generate with beams / several return sequences
        self.in_generate = 0
        self.graph = False  # graph mode (``freeze``): the engine's CUDA-graph decode steps
        self._plans: dict[tuple[int, int, str], MultiPlan] = {}
        self._fast: dict = {}  # per (layer, input shape, dtype, ...): the C++ kernel's calls, see _fast_entry
        self._fast_stamp = None  # (store table layout, backend setting) the prepared calls were made for
        self._lock = threading.Lock()
        self._assign()

    # -- slots and metadata ------------------------------------------------------------------
    def _assign(self) -> None:
        """Sync the store, make this batch's adapters resident and compute each row's slot."""
        self.store.sync()
        used = [n for n in self.names if n is not None and n != BASE]
        self._set_rows(self.store.acquire(used))
        self.version = self.store.version
        self._drop_plans()

    def _drop_plans(self) -> None:
        """Forget the per-shape plans and the calls prepared from them (rebuilt on the next use)."""
        self._plans = {}
        self._fast = {}

    def _set_rows(self, slots: dict) -> None:
        """Per rank bucket, each row's slot in that bucket's tables (-1: not this bucket)."""
        where = [None if (n is None or n == BASE) else slots[n] for n in self.names]
        self.active_buckets = sorted({w[0] for w in where if w is not None})
        # the buckets each layer call runs: a packed router (the engine) only those this batch
        # uses; a plain route every bucket of the store, so that a CUDA graph captured in it stays
        # valid when ``reroute`` switches to a mix in other buckets
        self.call_buckets = self.active_buckets if self.lengths is not None and not self.graph else self.store.buckets
        # tensors, so that a compiled forward reads the mix as data (a list would be baked into the
        # graph and guarded on, and every new mix would recompile)
        self.row_slot_tensors = {b: torch.tensor([w[1] if w is not None and w[0] == b else -1 for w in where],
                                                 dtype=torch.int32) for b in self.store.buckets}
        # graph mode: the adapter kernels are captured whatever this mix is (a graph captured for an
        # all-base batch must still apply adapters when a replay routes some)
        self.any_active = bool(self.active_buckets) or self.graph

    def reroute(self, names) -> None:
        """Switch to a new list of names of the same length, refilling the cached per-shape plans in
        place (same buffers): a CUDA graph captured inside this ``route`` replays with the new mix."""
        names = _check_names(self.state, names)
        if self.lengths is not None:
            raise ValueError("reroute: a route of packed segments (lengths=...) cannot be rerouted; open a new route")
        if len(names) != len(self.names):
            raise ValueError(f"reroute: got {len(names)} adapter names for a route of {len(self.names)} rows")
        plans = self._plans
        previous, self.names = self.names, names
        try:
            self._assign()  # may swap adapters into slots: in place, in the same stacked tensors
        except BaseException:  # e.g. more distinct adapters than slots: keep routing the previous names
            self.names = previous
            raise
        kept = {}
        for key, plan in plans.items():
            rows, tokens, _, b = key
            if b not in self.row_slot_tensors or plan.num_slots != self.store.capacity.get(b):
                continue  # the store changed (adapters added/removed): a new plan is built on use
            per_tok = self.row_slot_tensors[b].repeat_interleave(rows // len(names) * tokens)
            build_plan(per_tok.to(plan.row_slot.device), plan.num_slots, plan.block_m, out=plan)
            kept[key] = plan
        self._plans = kept
        self._fast = {}

    def repack(self, names: list[str | None], lengths: list[int], force: bool = False) -> None:
        """Point a packed router (``lengths=...``) at a new batch in place: the serving engine's
        step when a request joined or left or a prefill chunk ended. O(batch): slots are looked up
        (made resident if needed) for the new names only; the store is not walked. ``force``: the
        store was rebuilt (re-acquire every slot)."""
        lengths = [int(n) for n in lengths]
        if not force and names == self.names and lengths == self.lengths:
            return
        if force or names != self.names:
            used = [n for n in names if n is not None and n != BASE]
            slots = self.store.acquire(used)
            self.names = list(names)
            self.lengths = lengths
            self._set_rows(slots)
            self.version = self.store.version
        self.lengths = lengths
        self._drop_plans()
        self.repacks = getattr(self, "repacks", 0) + 1

    def freeze(self, device) -> None:
        """Graph mode, for a packed router of one token per segment (the engine's decode steps run
        from a captured CUDA graph, ``cuda_graphs.py``): every layer call runs every rank bucket of
        the store, so the captured launches stay valid whatever mix a replay routes; each bucket's
        plan is built now and only ever refilled in place (``refill``); and the C++ CPU kernel is
        called through its custom op, never straight (a direct call is no op a graph can record)."""
        if self.lengths is None or any(n != 1 for n in self.lengths):
            raise ValueError("freeze: graph mode needs a packed router of one token per segment (lengths all 1)")
        self.graph = True
        self.call_buckets = self.store.buckets
        self.any_active = True
        self._drop_plans()
        device = torch.device(device)
        n = len(self.lengths)
        for b in self.store.buckets:
            plan = build_plan(self._device_slots(b, device), self.store.capacity[b], SEGMENT_BLOCK_M)
            # the decoder's (1, n, K) inputs and an adapted LM head's (n, K) rows: one plan, two keys
            self._plans[(1, n, str(device), b)] = self._plans[(n, 1, str(device), b)] = plan

    def _device_slots(self, bucket: int, device: torch.device) -> torch.Tensor:
        host = self.row_slot_tensors[bucket]
        if device.type == "cuda":  # pinned: the copy neither syncs nor waits for the host
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def refill(self, names: list[str | None]) -> None:
        """Graph mode: route ``names`` (same length) by rewriting each bucket's plan in place -- the
        buffers a captured graph reads. The store's layout (buckets, capacities, tables) must be the
        one the router was frozen with; the engine recaptures when it is not."""
        if not self.graph:
            raise ValueError("refill: the router is not in graph mode (freeze it first)")
        if len(names) != len(self.lengths):
            raise ValueError(f"refill: got {len(names)} names for a router of {len(self.lengths)} segments")
        # re-acquire when the names changed, or when an eager step may have moved adapters between
        # slots meanwhile (LRU slots, adapters loaded or removed): acquire is O(names) and refills
        # nothing that is resident already
        if names != self.names or self.store.max_slots is not None or self.store.version != self.version:
            used = [n for n in names if n is not None and n != BASE]
            before = self.row_slot_tensors
            self.names = list(names)
            self._set_rows(self.store.acquire(used))
            self.version = self.store.version
            done = set()
            for (_, _, dev, b), plan in self._plans.items():
                if id(plan) in done or (b in before and torch.equal(before[b], self.row_slot_tensors[b])):
                    continue  # this bucket's rows kept their slots: its plan is already right
                done.add(id(plan))
                build_plan(self._device_slots(b, torch.device(dev)), plan.num_slots, plan.block_m, out=plan)
        self.refills = getattr(self, "refills", 0) + 1

    def _refresh_if_changed(self) -> None:
        if self.state.version != self.version:  # adapters added/removed while routing
            with self._lock:
                if self.state.version != self.version:
                    missing = [n for n in self.names if n not in (None, BASE) and n not in self.state.configs]
                    if missing:
                        raise ValueError(f"adapter {missing[0]!r} was removed while routing; "
                                         f"loaded: {list(self.state.configs)}")
                    self._assign()
                    for _, w in _wrappers(self.model):  # wrappers a new adapter created
                        w.routing = self

    def plan(self, rows: int, tokens: int, device: torch.device, bucket: int) -> MultiPlan:
        """Metadata for a (rows, tokens) input and one rank bucket: built once per shape and shared
        by every layer."""
        key = (rows, tokens, str(device), bucket)
        plan = self._plans.get(key)
        num_slots = self.store.capacity[bucket]
        if plan is None and self.lengths is not None:
            per_tok = self._segment_slots(rows * tokens, bucket)
            plan = build_plan(per_tok.to(device), num_slots, SEGMENT_BLOCK_M)
            self._plans[key] = plan
        if plan is None:
            n = len(self.names)
            if rows != n * self.expand:
                detail = f" (expanded x{self.expand} by generate)" if self.expand > 1 else ""
                raise ValueError(f"route: got {n} adapter names{detail} for a batch of {rows} rows; "
                                 "pass one name (or None) per row")
            per_tok = self.row_slot_tensors[bucket].repeat_interleave(self.expand * tokens)
            host = per_tok
            if torch.device(device).type == "cuda":  # pinned: a pageable copy syncs, and fails under capture
                host = per_tok.pin_memory()
                per_tok = host.to(device, non_blocking=True)
            plan = build_plan(per_tok.to(device), num_slots, SEGMENT_BLOCK_M)
            plan.__dict__["_host_row_slot"] = host  # a captured copy reads this buffer on replay
            self._plans[key] = plan
        return plan

    def _segment_slots(self, total: int, bucket: int) -> torch.Tensor:
        """Slot of each token of a packed batch (or of each segment, one token per segment)."""
        slots = self.row_slot_tensors[bucket]
        if total == sum(self.lengths):
            return slots.repeat_interleave(torch.tensor(self.lengths))
        if total == len(self.lengths):
            return slots
        raise ValueError(f"route: segments of lengths summing to {sum(self.lengths)} ({len(self.lengths)} "
                         f"segments) for an input of {total} tokens")

    # -- the hooks ---------------------------------------------------------------------------
    def check_batch(self, rows: int | None) -> None:
        """Called before the model's forward: fail on a wrong-length list before any compute."""
        if rows is None:
            return
        n = len(self.names)
        if self.lengths is not None:
            if rows != 1:
                raise ValueError(f"route: packed segments (lengths=...) need a batch of one row, got {rows}")
            return
        if rows == n:
            self.expand = 1
        elif self.in_generate and rows % n == 0:
            self.expand = rows // n
        else:
            raise ValueError(f"route: got {n} adapter names for a batch of {rows} rows; "
                             "pass one name (or None) per row")

    def _cpp_kernel(self, backend: str | None, device: torch.device):
        """The loaded C++ CPU kernel module when the multi-adapter op resolves to ``cpp`` (CPU
        tensors, ``auto`` or ``cpp``), else None. Resolved once per (backend, device, environment)."""
        key = (backend, device.type, os.environ.get(dispatch.ENV_VAR))
        cache = self.__dict__.setdefault("_cpp_cache", {})
        if key not in cache:
            ext = None
            if dispatch.resolve(MULTI_OP, backend, device) == "cpp":
                from ..ops.cpu_ext import load_cpu_extension

                ext = load_cpu_extension()
            cache[key] = ext
        return cache[key]

    def _rows_tokens(self, x: torch.Tensor) -> tuple[int, int]:
        """(rows, tokens per row) of a layer input, the key of its plans."""
        rows = x.shape[0] if x.dim() > 1 else 1
        batch = len(self.names) * self.expand
        if x.dim() == 2 and rows != batch and batch and rows % batch == 0:
            rows = batch  # a layer that sees (B*T, K): tokens of each row adjacent, row-major
        return rows, x.numel() // max(rows * x.shape[-1], 1)

    def check_fast_stamp(self) -> None:
        """Forget the prepared kernel calls when the store's table layout or the backend setting
        (``FASTADAPTERS_BACKEND``) changed since they were made; ``route`` calls it on entry."""
        stamp = (self.store.layout, os.environ.get(dispatch.ENV_VAR))
        if self._fast_stamp != stamp:
            self._fast, self._fast_stamp = {}, stamp

    def _fast_entry(self, layer: AdapterLinear, x: torch.Tensor, tables, rows: int, tokens: int):
        """The C++ CPU kernel's calls for this layer and input, built once per (layer, shape, dtype)
        while the plans and the store's tables stay (``(ext, pre, post_in, post_out, gemm_min_rows)``, a phase None
        when it has no table, each phase one ``TableCalls`` over its rank buckets); False where a
        layer call cannot take it (another backend, graph mode, tables or base weights of another
        dtype): the general path then runs."""
        backend = self.backend if self.backend is not None else layer.backend
        ext = self._cpp_kernel(backend, x.device) if not self.graph else None
        base_w = getattr(layer.base_layer, "weight", None)
        if ext is None or not hasattr(ext, "TableCalls") or base_w is None or base_w.dtype != x.dtype:
            return False
        calls = []
        for tabs in (tables.pre, tables.post_in, tables.post_out):
            picked = [(b, tabs[b]) for b in self.call_buckets if b in tabs]
            if any(t.down.dtype != x.dtype for _, t in picked):
                return False
            if not picked:
                calls.append(None)
                continue
            plans = [self.plan(rows, tokens, x.device, b) for b, _ in picked]
            calls.append(ext.TableCalls([p.row_slot for p in plans], [t.down for _, t in picked],
                                        [t.up for _, t in picked], [t.sizes_host for _, t in picked],
                                        [t.scales for _, t in picked], [t.act_host for _, t in picked]))
        return (ext, *calls, cpp_gemm_min_rows(x.dtype))

    def forward(self, layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
        self._refresh_if_changed()
        tables = self.store.tables(layer)
        if tables is None or not self.any_active:
            return layer.base_layer(x)
        # the CPU fast path: one prepared C++ call per phase (no per-bucket Python), for inference
        # outside torch.compile on a contiguous input. The entry is rebuilt when the plans change
        # (they are dropped with it), and when the store's table layout or the backend setting
        # does, which ``route`` checks once per forward (``check_fast_stamp``): this runs ~200 times
        # a serving step, so it does as little as it can (the kernel takes the layer's (..., K)
        # input and output as they are, no views)
        if not torch.is_grad_enabled() and x.is_contiguous() and not torch.compiler.is_compiling():
            key = (id(layer), x.shape, x.dtype, layer.backend, self.expand)
            entry = self._fast.get(key)
            if entry is None:
                entry = self._fast[key] = self._fast_entry(layer, x, tables, *self._rows_tokens(x))
            if entry is not False:
                ext, pre, post_in, post_out, gemm_rows = entry
                if pre is not None:  # never into the caller's input
                    x = x.clone()
                    ext.cpu_multi_adapter_calls_(x, x, pre, gemm_rows)
                y = layer.base_layer(x)
                if y.data_ptr() == x.data_ptr() or not y.is_contiguous():  # not a fresh output of ours
                    y = y.clone(memory_format=torch.contiguous_format)
                if post_in is not None:
                    ext.cpu_multi_adapter_calls_(y, x, post_in, gemm_rows)
                if post_out is not None:
                    ext.cpu_multi_adapter_calls_(y, y, post_out, gemm_rows)
                return y
        k = x.shape[-1]
        rows, tokens = self._rows_tokens(x)
        x2 = x.reshape(-1, k)
        backend = self.backend if self.backend is not None else layer.backend

        # may a phase write into its accumulator? Not into the layer's input (the caller's tensor),
        # and not where autograd records the graph; the base layer's fresh output, and what an
        # earlier call returned, are ours. Rows are disjoint across buckets (a row has one adapter),
        # so a bucket never reads rows another bucket of the same phase wrote.
        # (under torch.compile: no in-place writes and no direct kernel call; the ops are opaque custom ops there)
        no_graph = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        opaque = self.graph  # graph mode: every kernel call an op the capture records
        # the C++ CPU kernel, called straight (no per-call resolution or argument checks: the store's
        # tables are contiguous, int32 and fp32 where the kernel needs it) when it is the backend
        ext = self._cpp_kernel(backend, x.device) if no_graph and not opaque else None

        def phase(out, inp, tabs, owned):  # one multi-adapter call per rank bucket this layer and phase hold
            for b in self.call_buckets:
                t = tabs.get(b)
                if t is not None:
                    plan = self.plan(rows, tokens, x.device, b)
                    if ext is not None and inp.dtype == out.dtype == t.down.dtype and inp.is_contiguous():
                        if not (owned and out.is_contiguous()):
                            out = out.clone(memory_format=torch.contiguous_format)
                        ext.cpu_multi_adapter_(out, inp, plan.row_slot, t.down, t.up, t.sizes_host, t.scales,
                                               t.act_host, cpp_gemm_min_rows(out.dtype, t.up))
                    else:
                        out = multi_adapter(out, inp, plan.row_slot, *t.args(), plan=plan, backend=backend,
                                            check=False, sizes_host=t.sizes_host, act_host=t.act_host,
                                            inplace=owned and no_graph and not opaque, opaque=opaque)
                    owned = True
            return out, owned

        if tables.pre:
            x2, _ = phase(x2, x2, tables.pre, False)
        y = layer.base_layer(x2)
        fresh = no_graph and y.data_ptr() != x2.data_ptr()  # a base layer that returned its input is not ours
        if tables.post_in:
            y, fresh = phase(y, x2, tables.post_in, fresh)
        if tables.post_out:
            y, _ = phase(y, y, tables.post_out, fresh)
        return y.view(*x.shape[:-1], y.shape[-1])


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _check_names(state, names) -> list[str | None]:
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__"):
        raise ValueError(f"route: names must be a list with one adapter name (or None) per batch row, "
                         f"got {type(names).__name__} {names!r}")
    names = list(names)
    if not names:
        raise ValueError("route: names is empty; pass one adapter name (or None) per batch row")
    routable = [n for n, c in state.configs.items() if not isinstance(c, PrefixConfig)]
    for i, n in enumerate(names):
        if n is None or n == BASE:
            continue
        if not isinstance(n, str):
            raise ValueError(f"route: names[{i}] is {type(n).__name__} {n!r}; valid: an adapter name, "
                             f"None or {BASE!r}")
        if n not in routable:
            if n in state.configs:
                raise ValueError(f"route: names[{i}] = {n!r} is a prefix-tuning adapter, which cannot be routed "
                                 f"per row; routable adapters: {routable}")
            raise ValueError(f"route: unknown adapter {n!r} at names[{i}]; loaded: {routable} "
                             f"(None or {BASE!r} for the base model)")
    return names


@contextlib.contextmanager
def route(model: nn.Module, names, backend: str | None = None, lengths=None, reuse: Router | None = None):
    """Run ``model(...)`` / ``model.generate(...)`` with adapter ``names[i]`` on batch row i.

    ``lengths``: the batch is one packed row and ``names[i]`` covers its next ``lengths[i]``
    tokens (see the module docstring). ``reuse``: the router a previous ``route`` yielded; when
    it routes the same names, lengths and backend, it is used again with its per-shape metadata
    after the same store sync as a new one. A packed router (``lengths``) reused for a packed
    batch is repacked in place whatever the names and lengths (``Router.repack``: the serving
    engine's steps, as requests join and leave), with the O(1) store check ``sync(weights=False)``.

    ``backend`` ("torch" | "triton" | "cuda" | "auto") overrides the layers' backend for the
    multi-adapter op inside the block (None: each layer's, i.e. ``fa.set_backend``)."""
    dispatch.check_backend_name(backend)
    state = _state(model)
    if state is None:
        raise ValueError("route: this model has no fastadapters adapters; call fastadapters.patch or "
                         "fastadapters.load_adapter first")
    names = _check_names(state, names)
    if lengths is not None:
        if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__len__") or len(lengths) != len(names) \
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"route: lengths must be one integer >= 1 per name ({len(names)} names), got {lengths!r}")
    if model.training and any(getattr(state.configs[n], "dropout", 0) for n in set(names) if n not in (None, BASE)):
        _warn_once("route: the model is in training mode but routed forwards apply no adapter dropout "
                   "(routing is for inference; call model.eval() to silence this)")
    same = (reuse is not None and reuse.model is model and reuse.names == names and reuse.backend == backend
            and reuse.lengths == (None if lengths is None else [int(n) for n in lengths]))
    packed = (reuse is not None and reuse.model is model and reuse.backend == backend and lengths is not None
              and reuse.lengths is not None)
    if packed:  # the engine's steps: one router for good, repacked in place, O(1) store check
        router = reuse
        rebuilt = router.store.sync(weights=False)
        stale = rebuilt or router.store.version != router.version or router.store.max_slots is not None
        router.repack(names, lengths, force=stale)
    elif same:
        router = reuse
        rebuilt = router.store.sync()
        if rebuilt or router.store.version != router.version or router.store.max_slots is not None:
            router._assign()  # adapters changed, or LRU slots another route may have refilled
    else:
        router = Router(model, names, backend, lengths)
    # resolve the multi-adapter op's backend here, outside any compiled region: on the CPU that
    # builds (first use) or loads the C++ kernel, which a traced forward could not do
    param = next(model.parameters(), None)
    if param is not None:
        dispatch.resolve(MULTI_OP, backend, param.device)
    router.check_fast_stamp()
    wrappers = router.store.wrappers()
    version_in = state.version
    previous = [w.routing for w in wrappers]
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: router.check_batch(_batch_of(args, kwargs)),
                                           with_kwargs=True)
    had_generate = "generate" in model.__dict__
    orig_generate = model.__dict__.get("generate")
    if hasattr(model, "generate"):
        bound = model.generate

        @functools.wraps(bound)
        def generate(*args, **kwargs):
            router.in_generate += 1
            try:
                return bound(*args, **kwargs)
            finally:
                router.in_generate -= 1
                router.expand = 1

        model.__dict__["generate"] = generate
    prefix_active = state.active if isinstance(state.configs.get(state.active), PrefixConfig) else None
    if prefix_active is not None:
        state.active = None  # per-row routing has no prefix; restored on exit
    # (a plain attribute: object.__setattr__ skips nn.Module's parameter/buffer/module checks, which
    # cost ~3 us a wrapper, twice a serving step for every adapted layer)
    try:
        for w in wrappers:
            object.__setattr__(w, "routing", router)
        yield router
    finally:
        for w, prev in zip(wrappers, previous):
            object.__setattr__(w, "routing", prev)
        # wrappers created inside the block (an adapter loaded on new modules) stop routing too
        if state.version != version_in:
            for _, w in _wrappers(model):
                if w.routing is router:
                    w.routing = None
        hook.remove()
        if had_generate:
            model.__dict__["generate"] = orig_generate
        else:
            model.__dict__.pop("generate", None)
        if prefix_active is not None and state.active is None and prefix_active in state.configs:
            state.active = prefix_active
