"""CUDA graphs for the engine's decode steps (issue 19, item 7).

**This path has never run on a GPU.** It was written on a machine without one and is tested on the
CPU only (``tests/serving/test_decode_graphs.py``), where ``torch.cuda.graph`` cannot run: there the
capture is emulated by ``torch.fx``'s ``make_fx``, which, like a CUDA graph, records the step's
tensor ops once over fixed tensors, freezes every Python decision made while recording, refuses a
host read of a device value (``.item()``, ``.tolist()``, data-dependent shapes) and replays by
re-running only the recorded ops on whatever the fixed buffers hold then. Whether the capture
succeeds and replays correctly on CUDA is owed to a GPU session (``bench/gpu_session.sh``).

What runs from a graph: a step in which every scheduled request decodes one token (no prefill
chunk) of B requests, B at most the largest capture size. The step runs the graph captured for P,
the smallest capture size >= B (default 1, 2, 4, 8, then multiples of 8 up to ``max_num_seqs``, as
vLLM pads), its rows B..P-1 padding. Attention inside the graph:

- **FlashInfer** (``flashinfer_attention.py``, when the engine uses it): its ``use_cuda_graph`` mode
  reads the page tables from buffers fixed for the wrapper's life (one wrapper per P, sharing the
  engine's float workspace); ``plan`` fills them on the host before each replay. One graph per P.
- **SDPA** otherwise (no ``flashinfer`` on the machine, which is the GPU sessions' image, or an fp32
  model): the per-request loop of ``paged_attention`` cannot be captured (its shapes are each
  request's length), so the graph holds its padded decode batch instead (``DecodeBatch``: every
  row's own positions gathered from its own blocks into a fixed (P, W) slot buffer, a fixed key
  mask, one SDPA over the query heads grouped per KV head). W is the longest context in the step
  rounded up to a power of two (at least 16, at most ``max_model_len``), so a graph is captured per
  (P, W) actually met; the gather reads P x W positions per layer (padding at most 2x the step's
  longest context; a padding position reads its row's own position 0, masked: never another
  request's blocks nor the unwritten tail of its own last block). A step with P x W >
  ``SDPA_GRAPH_MAX_POSITIONS`` (32768) runs eagerly instead: there the padded gather (memory and
  time) would outgrow the eager step's per-request reads.

The rest of the step, either way:

- **Fixed buffers, refilled in place before each replay:** the step's token ids, positions and new
  KV slots (one pinned host tensor, one asynchronous copy); the attention's tables (above); each
  rank bucket's routing plan (``Router.refill``: every
  request's adapter slot, ``build_plan(..., out=plan)``, device ops outside the graph; skipped for
  a bucket whose rows kept their slots). The graph's output is the last hidden state of its P rows;
  the LM head runs after the replay on rows 0..B-1 only (a (P, vocab) output kept per graph would be
  the largest memory the graphs hold), except when an adapter wraps the output layer: routed per
  row, it then runs inside the graph.
- **Padding rows** decode token 0 at position 0 with no adapter; their keys/values go to a block
  reserved for them (``BlockPool(reserved=1)``: never handed to a request, so no request's context
  is ever written or read by them): context 1, that block.
- **Routing in graph mode** (``Router.freeze``): every layer call runs every rank bucket of the
  store, so a graph captured for one adapter mix replays any other mix of the same store layout;
  base rows (slot -1) cost the kernels nothing.
- **Captured lazily**, the first time a size is needed: one eager step (with FlashInfer, the
  engine's ordinary step, which learns the heads and softmax scale the model's attention passes;
  either way it warms every lazy initialisation: Triton compiles, cuBLAS handles, the CUDA kernel's
  metadata), then the capture (``torch.cuda.graph``, after a warm-up of the graph-mode step on a
  side stream, as PyTorch's documentation asks), then the replay that computes the step. An
  engine's graphs share one memory pool: they replay one at a time on one stream, and each one's
  output is read (by the LM head, queued on that stream) before the next replay may overwrite a
  temporary that a later capture placed in that memory. A failed capture puts the caller back on
  its stream.
- **Recaptured when what a graph holds changes:** the adapter store's layout (``store.layout``, a
  number that changes whenever a table tensor is allocated, grown or dropped and never repeats;
  the wrapped modules) or the LM head object. Loading an
  adapter into a free slot of an existing bucket, or swapping one into an LRU slot, writes the same
  tensors in place and keeps the graphs. A step whose page list outgrows a graph's page buffer
  recaptures that size with room for twice as many pages.

Every other step (prefill chunks, mixed steps, more requests than the largest size) runs eagerly
as before. ``Engine(cuda_graphs=...)``: "auto" (default) uses graphs on CUDA and says once, with a
RuntimeWarning, why not when it cannot (the multi-adapter op's torch backend reads plans on the
host; a dynamic / longrope rotary embedding recomputes its frequencies from the positions on the
host); True asks for them and is a ValueError where they cannot run (the CPU); False
(``serve --enforce-eager``) never captures. A replayed step that raises (a capture that fails, say)
makes the engine warn and run every later step eagerly (with True it raises).

Memory: the graphs' hidden-state outputs and temporaries (one layer's activations, and with SDPA
the P x W gather) come out of the same CUDA memory the KV budget (``--kv-cache-gb``, default half of
what is free at start) leaves; with FlashInfer each size also has a wrapper (its page tables and
FlashInfer's own 8 MiB integer workspace).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .flashinfer_attention import FlashInferAttention
from .hf_compat import paged_forward
from .paged_attention import DecodeBatch, Segment, StepTables, padded_slots

__all__ = ["capture_sizes", "cuda_capture", "DecodeGraphs", "graphs_unavailable"]

_warned: set[str] = set()


def capture_sizes(max_num_seqs: int, sizes=None) -> tuple[int, ...]:
    """The padded batch sizes graphs are captured for: ``sizes`` checked and sorted, or 1, 2, 4, 8
    and then every multiple of 8, up to ``max_num_seqs`` (which is always included)."""
    if sizes is None:
        out = {s for s in (1, 2, 4, 8) if s <= max_num_seqs} | set(range(16, max_num_seqs + 1, 8))
        out.add(max_num_seqs)
        return tuple(sorted(out))
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise ValueError(f"cuda_graph_sizes: got {sizes!r}; valid: a list of integers in 1..max_num_seqs "
                         f"({max_num_seqs})")
    sizes = list(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= max_num_seqs for s in sizes):
        raise ValueError(f"cuda_graph_sizes: got {sizes!r}; valid: a non-empty list of integers in 1..max_num_seqs "
                         f"({max_num_seqs})")
    return tuple(sorted(set(sizes)))


SDPA_GRAPH_MAX_POSITIONS = 32768  # P x W of an SDPA decode graph; a longer step runs eagerly


def graphs_unavailable(device, model, adapter_backend: str) -> str | None:
    """Why the engine cannot run decode steps from CUDA graphs here (None: it can)."""
    if torch.device(device).type != "cuda":
        return f"CUDA graphs need the model on CUDA; it is on {device}"
    if adapter_backend == "torch":
        return ("the multi-adapter op's torch backend reads its plans on the host, which a graph cannot "
                "capture; use the triton or cuda backend (or auto)")
    for module in model.modules():  # transformers' dynamic RoPE branches on max(position_ids) on the host
        kinds = getattr(module, "rope_type", None)
        for kind in (kinds.values() if isinstance(kinds, dict) else [kinds]):
            if isinstance(kind, str) and ("dynamic" in kind or kind == "longrope"):
                return (f"the model's rotary embedding ({kind!r}) recomputes its frequencies from the positions "
                        "on the host every forward, which a graph cannot capture")
    return None


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cuda_capture(fn: Callable[[], torch.Tensor], device, pool=None) -> Callable[[], torch.Tensor]:
    """Capture ``fn`` into a CUDA graph (after one warm-up run on a side stream) in memory pool
    ``pool``; returns the replay, which returns the graph's output tensor (the same tensor every
    time). A failed capture leaves the caller on the stream it was on."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    previous = torch.cuda.current_stream(device)
    previous.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    finally:  # torch.cuda.graph's exit ends the capture before it restores the stream; if that raises
        if torch.cuda.current_stream(device) != previous:
            torch.cuda.set_stream(previous)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    replay.graph = graph
    return replay


@dataclass
class _Graph:
    size: int  # P, the padded batch
    key: tuple  # what the capture holds (DecodeGraphs._key)
    flat: torch.Tensor  # (3P,) long on the device: token ids, positions, new KV slots
    attention: FlashInferAttention | None  # FlashInfer: the graph-mode wrapper and its page-table buffers
    decode: DecodeBatch | None  # SDPA: the fixed (P, W) slots and key mask
    router: object | None  # the frozen Router, or None for an unpatched model
    head_inside: bool = False  # the LM head is in the graph (an adapted output layer), else run after it
    replay: Callable[[], torch.Tensor] | None = None
    planned: tuple | None = None  # (heads, scaling) the attention is planned with


class DecodeGraphs:
    """The engine's captured decode steps, one per padded batch size (see the module docstring).
    ``capture``: how a step is captured, ``capture(fn, device) -> replay`` (default ``cuda_capture``;
    the CPU tests pass a ``make_fx`` emulation)."""

    def __init__(self, engine, sizes: tuple[int, ...], capture=None):
        if not engine.pool.reserved_blocks:
            raise ValueError("DecodeGraphs: the engine's block pool has no reserved block for padding rows")
        self.engine = engine
        self.sizes = tuple(sizes)
        self.max_size = self.sizes[-1]
        self._mempool = None
        self.capture = capture or self._cuda_capture
        self.graphs: dict[tuple[int, int], _Graph] = {}  # (P, W) -> its graph (W 0 with FlashInfer)
        self.scratch = engine.pool.reserved_blocks[0]
        self.stats = {"captures": 0, "replays": 0, "padding_rows": 0, "recaptures": 0, "too_long": 0}
        self._wrappers_key = None

    def _cuda_capture(self, fn, device):
        # one memory pool for this engine's graphs: they replay one at a time, on one stream, and what
        # each returns (its last hidden states) is read by the LM head, queued on that stream, before
        # the next replay can overwrite a temporary another capture placed there
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        return cuda_capture(fn, device, self._mempool)

    def size_for(self, b: int) -> int | None:
        """The capture size a decode step of ``b`` requests runs at (None: more than the largest)."""
        for s in self.sizes:
            if s >= b:
                return s
        return None

    def _key(self) -> tuple:
        """What a captured graph holds, beyond its own buffers: the adapter store's table layout (a
        table reallocated, a bucket added or dropped, other wrapped modules) and the LM head."""
        from ..patching import _state

        engine = self.engine
        head = engine.head()
        state = _state(engine.model)
        if state is None:
            return (None, id(head))
        from .store import get_store

        store = get_store(engine.model)
        store.sync(weights=False)  # O(1) unless adapters were loaded or removed since the last step
        if self._wrappers_key is None or self._wrappers_key[0] != (id(store), state.version):
            self._wrappers_key = ((id(store), state.version), tuple(id(w) for w in store.wrappers()))
        return (store.layout, tuple(sorted(store.capacity.items())), self._wrappers_key[1], id(head))

    def run(self, reqs, names: list[str | None]) -> torch.Tensor | None:
        """Logits (len(reqs), vocab) of one decode step of ``reqs`` (each decoding one token),
        ``names[i]`` the adapter routed for request i; the new keys/values are in the pool. None
        (nothing done) for an SDPA step longer than ``SDPA_GRAPH_MAX_POSITIONS``: run it eagerly."""
        engine, pool = self.engine, self.engine.pool
        bs = pool.block_size
        b = len(reqs)
        p = self.size_for(b)
        ids, pos, slots, segments, tables = [], [], [], [], []
        for i, req in enumerate(reqs):
            start = req.kv_len
            ids.extend(req.tokens(req.num_computed, 1))
            pos.append(start)
            slots.append(req.blocks[start // bs] * bs + start % bs)
            segments.append(Segment(i, 1, start + 1, None, -1))
            tables.append(req.block_table)
        pad = torch.tensor([self.scratch])
        for i in range(b, p):
            ids.append(0)
            pos.append(0)
            slots.append(self.scratch * bs)
            segments.append(Segment(i, 1, 1, None, -1))
            tables.append(pad)
        flashinfer = engine._flashinfer is not None
        pages = sum(-(-s.kv_len // bs) for s in segments) if flashinfer else 0
        width = 0 if flashinfer else self.width_for(max(s.kv_len for s in segments))
        if p * width > SDPA_GRAPH_MAX_POSITIONS:  # the padded gather would outgrow the eager step's reads
            self.stats["too_long"] += 1
            return None
        names = list(names) + [None] * (p - b)
        host = torch.tensor(ids + pos + slots, dtype=torch.long)
        if engine.device.type == "cuda":
            host = host.pin_memory()
        key = self._key()
        g = self.graphs.get((p, width))
        if g is not None and (g.key != key or (flashinfer and pages > g.attention.max_pages)):
            self.stats["recaptures"] += 1
            if g.key != key:  # the store's layout changed: every graph holds the old one
                self.graphs.clear()
            else:
                del self.graphs[(p, width)]
            g = None
        if g is None:
            room = max(2 * pages, p * (-(-engine.max_model_len // bs) + 1))  # every row at full length, or 2x the need
            g = self._capture(p, width, key, host, segments, tables, names, room)
            self.graphs[(p, width)] = g
        else:
            g.flat.copy_(host, non_blocking=True)
            if flashinfer:
                g.attention.step(segments, tables, bs).plan(pool, *g.planned)
            else:
                self._fill_decode(g.decode, segments, tables)
            if g.router is not None:
                g.router.refill(names)
        out = g.replay()[:b]
        logits = out if g.head_inside else engine.head()(out).float()
        self.stats["replays"] += 1
        self.stats["padding_rows"] += p - b
        heads = engine.model.config.num_attention_heads
        per_row = [s.kv_len for s in segments] if flashinfer else [width] * p
        engine.stats["attention_score_elements"] += pool.num_layers * heads * sum(per_row)
        if width:
            engine.stats["kv_bytes_gathered"] += (2 * pool.num_layers * p * width * pool.kv_heads * pool.head_dim
                                                  * pool.keys[0].element_size())
        return logits

    def width_for(self, longest: int) -> int:
        """W of the SDPA decode batch for a step whose longest context is ``longest`` positions."""
        w = max(16, 1 << (longest - 1).bit_length())
        return max(longest, min(w, self.engine.max_model_len))

    def _fill_decode(self, decode: DecodeBatch, segments, tables) -> None:
        """Refill a graph's decode batch in place for this step's rows."""
        slots, mask = padded_slots([s.kv_len for s in segments], tables, self.engine.pool.block_size, decode.width)
        if self.engine.device.type == "cuda":
            slots, mask = slots.pin_memory(), mask.pin_memory()
        decode.slots.copy_(slots, non_blocking=True)
        decode.mask.copy_(mask, non_blocking=True)

    def _capture(self, p: int, width: int, key: tuple, host: torch.Tensor, segments, tables, names,
                 max_pages: int) -> _Graph:
        from ..patching import _state

        engine, pool, model = self.engine, self.engine.pool, self.engine.model
        dev, bs = engine.device, pool.block_size
        flat = torch.empty(3 * p, dtype=torch.long, device=dev)
        flat.copy_(host)
        input_ids, position_ids, new_slots = flat[:p].view(1, p), flat[p:2 * p].view(1, p), flat[2 * p:]
        last = torch.arange(p, device=dev)
        g = _Graph(p, key, flat, None, None, None)
        if width:  # SDPA: every row in one padded decode batch of fixed buffers
            g.decode = DecodeBatch(torch.arange(p, device=dev), torch.empty(p * width, dtype=torch.long, device=dev),
                                   torch.empty(p, 1, 1, width, dtype=torch.bool, device=dev), width)
            self._fill_decode(g.decode, segments, tables)
            for seg in segments:
                seg.batched = True
        else:
            g.attention = FlashInferAttention(dev, graph_rows=p, max_pages=max_pages,
                                              workspace=engine._flashinfer.workspace)
        # the LM head runs after the replay, on the B real rows only (its (P, vocab) output would be
        # the largest tensor a graph keeps), unless an adapter wraps the output layer: routed
        # per row, it must run inside the route, i.e. inside the graph
        from ..layers import AdapterLinear

        g.head_inside = isinstance(model.get_output_embeddings(), AdapterLinear)
        head = engine._lm_head if g.head_inside else False

        def forward(step=None) -> torch.Tensor:
            tabs = StepTables(new_slots, segments, decode=g.decode)
            if step is not None:
                tabs.extra["flashinfer"] = step
            return paged_forward(model, input_ids, position_ids, pool, tabs, last, head)

        ctx = None
        if _state(model) is not None:
            from .routing import route

            ctx = route(model, names, backend=engine.backend, lengths=[1] * p)
            g.router = ctx.__enter__()
        try:
            if g.router is not None:
                g.router.freeze(dev)
            if width:  # (the capture's warm-up run initialises what is lazy outside the capture)
                g.replay = self.capture(lambda: forward(), dev)
            else:
                # one ordinary eager step first: it learns (heads, scaling) from the model's attention
                warm = engine._flashinfer.step(segments, tables, bs)
                forward(warm)
                g.planned = warm.planned
                graph_step = g.attention.step(segments, tables, bs)
                graph_step.plan(pool, *g.planned)
                g.replay = self.capture(lambda: forward(graph_step), dev)
        except BaseException:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            raise
        if ctx is not None:
            ctx.__exit__(None, None, None)
        g.key = self._key()  # route's full store sync may have rebuilt tables the capture then used
        self.stats["captures"] += 1
        return g
