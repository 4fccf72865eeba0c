"""Multi-adapter op: many LoRA and bottleneck adapters in one batch, each row routed to its own.

One op family serves LoRA (shrink/expand) and bottleneck adapters (down/act/up): LoRA is the
bottleneck with the identity activation. Semantics (shapes: y0 (M, N), x (M, K), row_slot (M,)
int32, down (S, R, K), up (S, N, R), sizes (S,) int32, scales (S,) fp32, act_ids (S,) int32)::

    for m in range(M):
        s = row_slot[m]
        if s < 0:                                   # base row: y0 as is, no work
            y[m] = y0[m]; continue
        r = sizes[s]                                # 0 <= r <= R; storage pads to R, compute does not
        h = down[s, :r, :] @ x[m]                   # (r,)  accumulated in fp32 (fp64 for fp64 inputs)
        y[m] = y0[m] + scales[s] * up[s, :, :r] @ act[act_ids[s]](h)   # cast to y0's dtype

``act_ids`` are ``fastadapters.ops.bottleneck.ACT_IDS``: 0 identity (LoRA: down = A, up = B,
scale = alpha/r), 1 tanh, 2 relu, 3 gelu (erf), 4 silu, 5 sigmoid.

What lives here:

- ``multi_adapter_ref``: the loop above in plain torch (fp64-able), the statement tests compare to.
- ``MultiPlan`` / ``build_plan``: the per-row metadata every layer shares (rows sorted by slot,
  per-slot segments, fixed-size row tiles). Built with static-shape torch ops and no host sync, so a
  CUDA graph can replay it (``build_plan(..., out=plan)`` refills the same buffers for a new mix).
- the torch path (``multi_adapter_torch``): rows are grouped by slot into row tiles, each tile's
  adapter weights are gathered, and the tiles run as one ``torch.bmm`` per *rank class* (sizes
  rounded up to a power of two), so a rank-4 adapter costs rank-4..8 work beside a rank-64 one
  and base rows cost nothing. The loops are over at most log2(R)+1 rank classes and at most six
  activation kinds, never over adapters.
- the ``triton`` backend (``fastadapters::multi_adapter_triton``, a ``torch.library.custom_op``
  with a fake) launching ``fastadapters.kernels.multi``; and the ``cuda`` backend when the compiled
  extension provides ``torch.ops.fastadapters.cuda_multi_adapter`` (a decode kernel: batches of
  more than ``CUDA_MAX_ROWS`` rows go to the Triton segmented path).
- the ``cpp`` backend (``multi_adapter_cpp``): the C++ CPU kernel (csrc/cpu_multi_adapter.cpp,
  built on first use by ``ops.cpu_ext``), what ``auto`` takes for CPU tensors: rows grouped by slot
  in the kernel (no plan), large slot groups as ATen GEMMs, small ones (decode) as fused dot
  products, in place when the caller owns ``y0``; a ``custom_op`` wraps it for torch.compile.
- ``multi_adapter``: the checked entry point, dispatching on ``backend``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import dispatch
from .bottleneck import ACT_IDS

OP = "multi_adapter"

#: activation id -> function, ids as ``ACT_IDS`` (swish is silu's alias)
ACT_BY_ID = {0: lambda t: t, 1: torch.tanh, 2: F.relu, 3: F.gelu, 4: F.silu, 5: torch.sigmoid}
ACT_NAMES = {0: "identity", 1: "tanh", 2: "relu", 3: "gelu", 4: "silu", 5: "sigmoid"}
assert all(ACT_IDS[n] == i for i, n in ACT_NAMES.items())


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------

def multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, act_ids):
    """The semantics in the module docstring, one row at a time (slow; for tests)."""
    cd = _compute_dtype(y0, x, down, up)
    y = y0.clone()
    slots, sz, act = row_slot.tolist(), sizes.tolist(), act_ids.tolist()
    for m, s in enumerate(slots):
        if s < 0 or sz[s] == 0:
            continue
        r = sz[s]
        h = down[s, :r, :].to(cd) @ x[m].to(cd)
        d = scales[s].to(cd) * (up[s, :, :r].to(cd) @ ACT_BY_ID[act[s]](h))
        y[m] = (y0[m].to(cd) + d).to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def check_multi_args(y0, x, row_slot, down, up, sizes, scales, act_ids, check_values: bool = True) -> None:
    """Shape/dtype checks that name the bad value; ``check_values`` also reads row_slot/sizes/act_ids
    (a host sync on CUDA; the router skips it because it built row_slot itself)."""
    if x.dim() != 2:
        raise ValueError(f"expected x of shape (M, K), got {tuple(x.shape)}")
    m, k = x.shape
    if y0.dim() != 2 or y0.shape[0] != m:
        raise ValueError(f"expected y0 of shape ({m}, N), got {tuple(y0.shape)}")
    n = y0.shape[1]
    dispatch.check_shape("row_slot", row_slot, (m,))
    if down.dim() != 3 or down.shape[2] != k:
        raise ValueError(f"expected down of shape (S, R, {k}), got {tuple(down.shape)}")
    s, r = down.shape[0], down.shape[1]
    dispatch.check_shape("up", up, (s, n, r))
    dispatch.check_shape("sizes", sizes, (s,))
    dispatch.check_shape("scales", scales, (s,))
    dispatch.check_shape("act_ids", act_ids, (s,))
    for name, t in (("row_slot", row_slot), ("sizes", sizes), ("act_ids", act_ids)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected {name} of dtype int32, got {t.dtype}")
    for name, t in (("y0", y0), ("x", x), ("down", down), ("up", up), ("scales", scales)):
        if not t.is_floating_point():
            raise ValueError(f"expected {name} of a floating dtype, got {t.dtype}")
    devs = {t.device for t in (y0, x, row_slot, down, up, sizes, scales, act_ids)}
    if len(devs) != 1:
        raise ValueError(f"expected all tensors on one device, got {sorted(map(str, devs))}")
    if check_values and m and s:
        lo, hi = int(row_slot.min()), int(row_slot.max())
        if lo < -1 or hi >= s:
            bad = lo if lo < -1 else hi
            raise ValueError(f"row_slot: got slot {bad}; valid: -1 (base) or 0..{s - 1}")
    if check_values and s:
        smin, smax = int(sizes.min()), int(sizes.max())
        if smin < 0 or smax > r:
            raise ValueError(f"sizes: got {smin if smin < 0 else smax}; valid: 0..{r} (the padded rank R)")
        bad = sorted(set(act_ids.tolist()) - set(ACT_BY_ID))
        if bad:
            raise ValueError(f"act_ids: got {bad[0]}; valid: {sorted(ACT_BY_ID)} ({ACT_NAMES})")


# ---------------------------------------------------------------------------------------------
# per-row metadata shared by every layer
# ---------------------------------------------------------------------------------------------

@dataclass
class MultiPlan:
    """Rows grouped by slot, computed once per forward and shared by all layers and phases.

    ``sorted_rows`` lists active rows by slot then base rows; slot s owns
    ``sorted_rows[seg_start[s] : seg_start[s] + seg_count[s]]``. That segment is cut into tiles of
    ``block_m`` rows: tile t covers ``sorted_rows[tile_start[t] : tile_start[t] + tile_len[t]]`` of
    slot ``tile_slot[t]`` (-1: unused tile). Shapes depend on (M, S, block_m) only.
    """

    row_slot: torch.Tensor  # (M,) int32
    num_slots: int
    block_m: int
    sorted_rows: torch.Tensor  # (M,) int32
    seg_start: torch.Tensor  # (S,) int32
    seg_count: torch.Tensor  # (S,) int32
    tile_slot: torch.Tensor  # (cdiv(M, block_m) + S,) int32
    tile_start: torch.Tensor
    tile_len: torch.Tensor
    _torch_layout: tuple | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        return int(self.row_slot.shape[0])

    def torch_layout(self):
        """Host-side row tiles for the torch path (cached; a host sync on CUDA)."""
        if self._torch_layout is None:
            self._torch_layout = _torch_layout(self.row_slot, self.num_slots)
        return self._torch_layout


def max_tiles(m: int, s: int, block_m: int) -> int:
    return -(-m // block_m) + s


def build_plan(row_slot: torch.Tensor, num_slots: int, block_m: int = 64, out: MultiPlan | None = None) -> MultiPlan:
    """The ``MultiPlan`` of ``row_slot`` (values -1..num_slots-1). Static shapes, no host sync;
    with ``out`` the same buffers are refilled (for CUDA-graph replay with a new adapter mix)."""
    dev = row_slot.device
    m, s = int(row_slot.shape[0]), int(num_slots)
    if s < 1:
        raise ValueError(f"num_slots: got {num_slots}; valid: >= 1")
    slot_c = torch.where(row_slot < 0, torch.full_like(row_slot, s), row_slot).long()
    sorted_rows = torch.sort(slot_c, stable=True).indices
    counts = torch.zeros(s + 1, dtype=torch.long, device=dev).scatter_add_(0, slot_c, torch.ones_like(slot_c))
    cnt = counts[:s]
    seg_start = torch.cumsum(counts, 0)[:s] - cnt
    tiles = (cnt + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles(m, s, block_m), device=dev)
    slot_of_t = torch.searchsorted(tile_end, t, right=True)
    valid = slot_of_t < s
    sc = slot_of_t.clamp(max=s - 1)
    local = t - (tile_end[sc] - tiles[sc])
    tile_start = seg_start[sc] + local * block_m
    tile_len = (cnt[sc] - local * block_m).clamp(0, block_m)
    tile_slot = torch.where(valid, sc, torch.full_like(sc, -1))
    fields = dict(sorted_rows=sorted_rows, seg_start=seg_start, seg_count=cnt, tile_slot=tile_slot,
                  tile_start=torch.where(valid, tile_start, 0), tile_len=torch.where(valid, tile_len, 0))
    fields = {k: v.to(torch.int32) for k, v in fields.items()}
    if out is None:
        # a copy: refilling the plan later must not write into the caller's tensor
        return MultiPlan(row_slot=row_slot.to(torch.int32, copy=True), num_slots=s, block_m=block_m, **fields)
    if out.num_slots != s or out.block_m != block_m or out.num_rows != m:
        raise ValueError("build_plan(out=...): the plan was built for another (M, S, block_m)")
    out.row_slot.copy_(row_slot)
    for k, v in fields.items():
        getattr(out, k).copy_(v)
    out._torch_layout = None
    for k in ("_parts", "_torch_idx", "_gathered"):
        out.__dict__.pop(k, None)
    meta = out.__dict__.get("_cuda_meta")
    if meta is not None:  # refill in place: a captured CUDA graph holds these very buffers
        from .cuda_ops import multi_adapter_meta

        multi_adapter_meta(out.row_slot, s, out=meta)
    return out


def _torch_layout(row_slot: torch.Tensor, s: int):
    """(rows, tile_of_row, lane, tile_slot, L) on the CPU: active rows grouped by slot into tiles of
    L rows, L = next power of two of the mean rows per used slot (<= 64), so padding < 2x the rows."""
    rs = row_slot.detach().to("cpu", torch.long)
    act = torch.nonzero(rs >= 0).flatten()
    if act.numel() == 0:
        return None
    slots = rs[act]
    order = torch.sort(slots, stable=True).indices
    rows, srt = act[order], slots[order]
    counts = torch.bincount(srt, minlength=s)
    used = int((counts > 0).sum())
    L = min(64, 1 << max(0, math.ceil(math.log2(max(1.0, rows.numel() / used)))))
    tiles_per = (counts + L - 1) // L
    tile_off = torch.cumsum(tiles_per, 0) - tiles_per
    seg_start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel()) - seg_start[srt]
    tile_of_row = tile_off[srt] + pos // L
    lane = pos % L
    tile_slot = torch.repeat_interleave(torch.arange(s), tiles_per)
    return rows, tile_of_row, lane, tile_slot, L


# ---------------------------------------------------------------------------------------------
# torch path: row tiles x gathered weights, one bmm per rank class
# ---------------------------------------------------------------------------------------------

def _partition(layout, sz: torch.Tensor, act: torch.Tensor, r_max: int, dev: torch.device):
    """Tiles grouped by rank class for one table: [(c, sel, slots, act_groups, drop)], whole.

    c: the class width (next power of two >= size, at most R); sel/slots: that class's tiles and
    their slots (on ``dev``); act_groups: [(act_id, tile indices within the class or None = all)];
    drop: (t, 1, c) bool mask of padded ranks, or None; whole: one class covering every tile."""
    rows, tile_of_row, lane, tile_slot, L = layout
    tile_size = sz.long()[tile_slot]
    cls = torch.where(tile_size > 0, 2 ** torch.ceil(torch.log2(tile_size.clamp(min=1).double())).long(), 0)
    cls = cls.clamp(max=r_max)
    groups = []
    for c in torch.unique(cls).tolist():
        if c <= 0:
            continue
        sel = torch.nonzero(cls == c).flatten()
        sl = tile_slot[sel]
        acts = act.long()[sl]
        kinds = torch.unique(acts).tolist()
        if len(kinds) == 1:
            act_groups = [(kinds[0], None)] if kinds[0] else []
        else:
            act_groups = [(a, torch.nonzero(acts == a).flatten().to(dev)) for a in kinds if a]
        short = tile_size[sel] < c
        drop = None
        if bool(short.any()):
            drop = (torch.arange(c) >= tile_size[sel][:, None]).to(dev)[:, None, :]
        groups.append((c, sel.to(dev), sl.to(dev), act_groups, drop))
    whole = len(groups) == 1 and bool((cls > 0).all())
    # one tile per used slot (decode): gathered weights are one copy of the used adapters at most,
    # so the torch path may keep them between calls
    one_tile_per_slot = int(torch.unique(tile_slot).numel()) == int(tile_slot.numel())
    return groups, whole, one_tile_per_slot


def multi_adapter_torch(y0, x, row_slot, down, up, sizes, scales, act_ids, plan: MultiPlan | None = None,
                        sizes_host: torch.Tensor | None = None, act_host: torch.Tensor | None = None):
    """The torch path (CPU serving; the fallback on CUDA, where it syncs to read the layout).

    With a plan and CPU ``sizes_host``/``act_host`` (the store's), the layout and each table's
    rank-class partition are computed once and cached on the plan (keyed by those tensors' version
    counters, which a slot fill bumps), so a decode step does only the gathers and bmms."""
    s_slots, r_max = down.shape[0], down.shape[1]
    layout = plan.torch_layout() if plan is not None else _torch_layout(row_slot, s_slots)
    if layout is None:
        return y0.clone()
    dev = x.device
    sz = sizes_host if sizes_host is not None else sizes.cpu()
    act = act_host if act_host is not None else act_ids.cpu()
    cache = plan.__dict__.setdefault("_parts", {}) if (plan is not None and sizes_host is not None
                                                       and act_host is not None) else None
    key = (id(sizes_host), sizes_host._version, id(act_host), act_host._version, r_max, str(dev)) \
        if cache is not None else None
    part = cache.get(key) if cache is not None else None
    if part is None:
        part = _partition(layout, sz, act, r_max, dev)
        if cache is not None:
            cache[key] = part
    groups, whole, one_tile_per_slot = part
    if not groups:
        return y0.clone()
    rows, tile_of_row, lane, tile_slot, L = layout
    idx = plan.__dict__.get("_torch_idx") if plan is not None else None
    if idx is None or idx[0] != str(dev):
        idx = (str(dev), rows.to(dev), (tile_of_row * L + lane).to(dev))
        if plan is not None:
            plan.__dict__["_torch_idx"] = idx
    _, rows_d, pos_d = idx
    cd = _compute_dtype(y0, x, down, up)
    k, n = x.shape[1], y0.shape[1]
    ntiles = int(tile_slot.numel())
    xr = x.index_select(0, rows_d).to(cd)
    if pos_d.numel() == ntiles * L:  # every lane used (e.g. L = 1): the rows are the tiles
        xt = x.new_empty((ntiles * L, k), dtype=cd).index_copy_(0, pos_d, xr).view(ntiles, L, k)
    else:
        xt = x.new_zeros((ntiles * L, k), dtype=cd).index_copy_(0, pos_d, xr).view(ntiles, L, k)
    delta = None if whole else x.new_zeros((ntiles, L, n), dtype=cd)
    # the gathered weights of each rank class, scaled, padding zeroed: kept on the plan for decode
    # (one tile per slot) and reused while the tables' contents are unchanged (version counters)
    store = plan.__dict__.setdefault("_gathered", {}) if (cache is not None and one_tile_per_slot) else None
    hit = wkey = versions = None
    if store is not None:
        wkey = (id(down), id(up), id(scales), id(sizes_host), id(act_host), cd)  # one entry per table
        versions = (down._version, up._version, scales._version, sizes_host._version, act_host._version)
        hit = store.get(wkey)
    gathered = hit[1] if (hit is not None and hit[0] == versions) else None
    if gathered is None:
        gathered = []
        sc_all = scales.to(cd)
        for c, sel_d, sl_d, act_groups, drop in groups:
            # the first c ranks of the tiles' slots, gathered into new tensors of that size only
            wd_t = down[:, :c].index_select(0, sl_d).transpose(1, 2).to(cd)  # (t, K, c)
            wu = up[:, :, :c].index_select(0, sl_d).to(cd) * sc_all.index_select(0, sl_d)[:, None, None]
            if drop is not None:  # ranks beyond an adapter's size are padding: never read them
                wu.masked_fill_(drop, 0.0)
            gathered.append((wd_t, wu.transpose(1, 2)))  # (t, K, c), (t, c, N)
        if store is not None:
            store[wkey] = (versions, gathered)  # replaces this table's copy from before a slot fill
    for (c, sel_d, sl_d, act_groups, drop), (wd_t, wu_t) in zip(groups, gathered):
        h = torch.bmm(xt if whole else xt.index_select(0, sel_d), wd_t)  # (t, L, c)
        for a, which in act_groups:  # at most six activation kinds, never a loop over adapters
            if which is None:
                h = ACT_BY_ID[a](h)
            else:
                h.index_copy_(0, which, ACT_BY_ID[a](h.index_select(0, which)))
        if drop is not None:
            h = h.masked_fill(drop, 0.0)
        out = torch.bmm(h, wu_t)
        if whole:
            delta = out
        else:
            delta.index_copy_(0, sel_d, out)
    d_rows = delta.view(ntiles * L, n).index_select(0, pos_d)
    y = y0.clone()
    if y.dtype == cd:
        y.index_add_(0, rows_d, d_rows)
    else:
        y.index_copy_(0, rows_d, (y0.index_select(0, rows_d).to(cd) + d_rows).to(y.dtype))
    return y


@torch.library.custom_op("fastadapters::multi_adapter_torch", mutates_args=())
def multi_adapter_torch_op(y0: torch.Tensor, x: torch.Tensor, row_slot: torch.Tensor, down: torch.Tensor,
                           up: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor,
                           act_ids: torch.Tensor) -> torch.Tensor:
    """The torch path as one opaque op, for torch.compile: it reads the routing on the host, which
    a traced graph cannot, so under compile the layout is recomputed inside the op on every call."""
    return multi_adapter_torch(y0, x, row_slot, down, up, sizes, scales, act_ids)


@multi_adapter_torch_op.register_fake
def _(y0, x, row_slot, down, up, sizes, scales, act_ids):
    return torch.empty_like(y0)


def _multi_adapter_torch_entry(y0, x, row_slot, down, up, sizes, scales, act_ids, plan=None, sizes_host=None,
                               act_host=None):
    if torch.compiler.is_compiling():  # no graph break per layer and phase: one opaque op instead
        return multi_adapter_torch_op(y0, x, row_slot, down, up, sizes, scales, act_ids)
    return multi_adapter_torch(y0, x, row_slot, down, up, sizes, scales, act_ids, plan, sizes_host, act_host)


dispatch.register(OP, "torch", _multi_adapter_torch_entry)


# ---------------------------------------------------------------------------------------------
# triton backend: a custom op (torch.compile sees no graph break), kernels in fastadapters.kernels
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastadapters::multi_adapter_triton", mutates_args=())
def multi_adapter_triton_op(y0: torch.Tensor, x: torch.Tensor, sorted_rows: torch.Tensor,
                            seg_start: torch.Tensor, seg_count: torch.Tensor, tile_slot: torch.Tensor,
                            tile_start: torch.Tensor, tile_len: torch.Tensor, down: torch.Tensor,
                            up: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor,
                            act_ids: torch.Tensor, block_m: int, gather: bool) -> torch.Tensor:
    from ..kernels import multi as km  # lazy: importing triton is not free

    return km.multi_adapter_launch(y0, x, sorted_rows, seg_start, seg_count, tile_slot, tile_start, tile_len,
                                   down, up, sizes, scales, act_ids, block_m, gather)


@multi_adapter_triton_op.register_fake
def _(y0, x, sorted_rows, seg_start, seg_count, tile_slot, tile_start, tile_len, down, up, sizes, scales,
      act_ids, block_m, gather):
    return torch.empty_like(y0)


#: rows at or below which the triton backend takes the gather (decode) path
GATHER_MAX_ROWS = 64
SEGMENT_BLOCK_M = 64


def multi_adapter_triton(y0, x, row_slot, down, up, sizes, scales, act_ids, plan: MultiPlan | None = None,
                         sizes_host=None, act_host=None):
    """Launch the Triton kernels: gather path for M <= GATHER_MAX_ROWS, segmented path above.
    The path depends on M only (not on the adapter mix), so a captured graph stays valid."""
    if plan is None or plan.block_m != SEGMENT_BLOCK_M:
        plan = build_plan(row_slot, down.shape[0], SEGMENT_BLOCK_M)
    gather = x.shape[0] <= GATHER_MAX_ROWS
    return multi_adapter_triton_op(y0, x, plan.sorted_rows, plan.seg_start, plan.seg_count, plan.tile_slot,
                                   plan.tile_start, plan.tile_len, down, up, sizes.to(torch.int32),
                                   scales.to(torch.float32), act_ids.to(torch.int32), plan.block_m, gather)


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


_TRITON_OK = _triton_importable()
if _TRITON_OK:  # as ops.lora / ops.bottleneck: no triton, no triton backend (auto takes another)
    dispatch.register(OP, "triton", multi_adapter_triton)

#: rows above which the ``cuda`` backend hands the batch to the Triton segmented path: the C++
#: kernel is a decode kernel (one CTA per segment and K chunk for the shrink), so at M = 16384,
#: R = 64 its down projection ran on ~4 CTAs (about 4 ms a layer); the segmented path tiles rows
CUDA_MAX_ROWS = 256


def _register_cuda_backend() -> None:
    """The CUDA C++ kernel (``fastadapters.ops.cuda_ops.multi_adapter_cuda``, csrc/) as the ``cuda``
    backend; its segment metadata is computed once per plan and shared by all layers."""
    try:
        from .cuda_ops import multi_adapter_cuda as _cuda, multi_adapter_meta as _meta
    except Exception:  # the CUDA engineer's module is absent or broken: no cuda backend
        return

    def multi_adapter_cuda(y0, x, row_slot, down, up, sizes, scales, act_ids, plan=None, sizes_host=None,
                           act_host=None):
        if x.shape[0] > CUDA_MAX_ROWS:  # prefill-sized: the C++ decode kernel would run on a few CTAs
            if _TRITON_OK:
                return multi_adapter_triton(y0, x, row_slot, down, up, sizes, scales, act_ids, plan)
            dispatch._warn_once(OP, "cuda-prefill", f"fastadapters: {OP} with backend 'cuda' runs the "
                                f"C++ decode kernel on {x.shape[0]} rows (> {CUDA_MAX_ROWS}), slow for prefill: "
                                "the Triton segmented path it hands such batches to needs triton")
        meta = None
        if plan is not None:
            meta = plan.__dict__.get("_cuda_meta")
            if meta is None:
                meta = plan.__dict__["_cuda_meta"] = _meta(plan.row_slot, plan.num_slots)
        return _cuda(y0, x, row_slot.to(torch.int32), down, up, sizes.to(torch.int32),
                     scales.to(torch.float32), act_ids.to(torch.int32), meta=meta)

    dispatch.register(OP, "cuda", multi_adapter_cuda)


_register_cuda_backend()


# ---------------------------------------------------------------------------------------------
# cpp backend: the C++ CPU kernel (csrc/cpu_multi_adapter.cpp, built on first use), in place
# ---------------------------------------------------------------------------------------------

#: rows of one slot at or above which the C++ kernel runs that slot's rows as two GEMMs (ATen's);
#: fewer run as fused loops over the slot's weight rows (decode, prefill chunks).
#: Measured on a 2-core EPYC, one thread, SmolLM2 shapes (K 576, N 576): for bf16 / fp16 / fp64
#: (the generic loops) the GEMMs win from about 16 rows at rank 64 and from about 64 rows at rank 8
#: (their fixed cost per group is ~40 us). float32 and bfloat16 with the store's storage have loops
#: of their own: for 3+ rows, register tiles (4 rows x 4 ranks down, 4 rows x 64 outputs up summed
#: over all ranks in registers, in chunks of 64 rows; 2 rows a tile in an AVX2 build). Built for
#: AVX-512 (a Zen 5 EPYC, whose 512-bit units run 16 floats an instruction) they beat ATen's GEMMs
#: (MKL's sgemm, which runs its generic code path on AMD CPUs; oneDNN for bfloat16) at every group
#: size measured, 3 to 1024 rows, ranks 8-64, K / N of 576 / 1536 / 192: float32 150-200 GFLOP/s
#: against 80-107 from 64 rows up (one thread), 270-380 against 160-210 (two threads); bfloat16
#: 1.3-2x oneDNN's. A chunk's cost per row does not depend on the group's size, so the AVX-512
#: build never takes the GEMMs for them. In the engine (SmolLM2-135M fp32, 32 requests of 8-64
#: prompt tokens, one thread) the kernel's time over the three prefill steps went from 100-133 ms
#: (the previous loops: 2 x 4 blocks, GEMMs from 128 rows) to 61-72 ms with A = 8 and A = 32
#: adapters. The AVX2 build's tiles run 45-95 GFLOP/s, about the GEMMs' speed at 64 rows, so it
#: keeps 64. Not measured on an Intel CPU, where MKL takes its AVX-512 path.
CPP_GEMM_MIN_ROWS = 16
CPP_GEMM_MIN_ROWS_F32 = 64
CPP_GEMM_MIN_ROWS_F32_AVX512 = 1 << 62  # never (above)


def cpp_gemm_min_rows(dtype: torch.dtype, up: torch.Tensor | None = None) -> int:
    """The C++ kernel's GEMM threshold for inputs of ``dtype`` (above): float32's and bfloat16's own
    loops exist for the adapter store's transposed ``up`` storage (strides (N*R, 1, N)), which
    ``up=None`` means, and their threshold depends on the loaded build's instruction set; a
    contiguous (S, N, R) ``up`` and the other dtypes take the generic loops and their threshold."""
    transposed = up is None or (up.dim() == 3 and up.stride(1) == 1 and up.stride(2) == up.shape[1])
    if dtype not in (torch.float32, torch.bfloat16) or not transposed:
        return CPP_GEMM_MIN_ROWS
    from . import cpu_ext

    return CPP_GEMM_MIN_ROWS_F32_AVX512 if cpu_ext.LOADED_ISA == "avx512" else CPP_GEMM_MIN_ROWS_F32


def _cpp_probe() -> str | None:
    from . import cpu_ext
    from .cpu_ext import CpuExtensionUnavailable, load_cpu_extension

    if cpu_ext._LOADED is not None:  # loaded: no lock taken (torch.compile traces this check)
        return None
    try:
        load_cpu_extension()
    except CpuExtensionUnavailable as e:
        return str(e)
    return None


def multi_adapter_cpp(y0, x, row_slot, down, up, sizes, scales, act_ids, plan=None, sizes_host=None,
                      act_host=None, inplace: bool = False):
    """The C++ CPU kernel: ``y0`` plus each row's adapter delta, in place on ``y0`` when ``inplace``
    (the caller owns it; ``x`` may be ``y0`` itself), else on a copy. Inputs of mixed dtypes are
    computed in the accumulate dtype and cast back. Forward only: where autograd would need a graph
    (grad enabled and an input that requires grad) it warns once and runs the torch path."""
    from .cpu_ext import load_cpu_extension

    if torch.is_grad_enabled() and any(t.requires_grad for t in (y0, x, down, up, scales)):
        dispatch._warn_once(OP, "cpp-grad", f"fastadapters: {OP}'s cpp kernel has no backward; inputs that require "
                            "grad run the torch path (slower; use torch.no_grad() / inference_mode for serving)")
        return multi_adapter_torch(y0, x, row_slot, down, up, sizes, scales, act_ids, plan, sizes_host, act_host)
    owned = inplace and y0.is_contiguous()
    if not (x.dtype == down.dtype == up.dtype == y0.dtype):  # e.g. a bf16 model with fp32 tables
        cd = _compute_dtype(y0, x, down, up)  # the contract's accumulate precision, then y0's dtype
        yc = y0.to(cd)
        if yc.data_ptr() == y0.data_ptr() and not owned:  # y0 is in cd already: .to returned y0 itself
            yc = y0.clone(memory_format=torch.contiguous_format)
        y = multi_adapter_cpp(yc, x.to(cd), row_slot, down.to(cd), up.to(cd), sizes, scales, act_ids,
                              sizes_host=sizes_host, act_host=act_host, inplace=True)
        if owned:
            return y0 if y.data_ptr() == y0.data_ptr() else y0.copy_(y)
        return y if y.dtype == y0.dtype else y.to(y0.dtype)
    y = y0 if owned else y0.clone(memory_format=torch.contiguous_format)
    if sizes_host is not None:  # the store's CPU copies: the same values as sizes / act_ids
        sizes, act_ids = sizes_host, act_host
    _, n, r = up.shape
    if not (up.stride(2) == 1 and up.stride(1) == r) and not (up.stride(1) == 1 and up.stride(2) == n):
        up = up.contiguous()  # the kernel reads (S, N, R) contiguous or the store's transposed (S, R, N) storage
    load_cpu_extension().cpu_multi_adapter_(
        y, x.contiguous(), row_slot.to(torch.int32).contiguous(), down.contiguous(), up,
        sizes.to(torch.int32).contiguous(), scales.to(torch.float32).contiguous(),
        act_ids.to(torch.int32).contiguous(), cpp_gemm_min_rows(y.dtype, up))
    if owned:  # the kernel writes through a raw pointer: tell autograd y0 changed, as an in-place op would
        torch.autograd.graph.increment_version(y)
    return y


dispatch.register(OP, "cpp", multi_adapter_cpp, probe=_cpp_probe)


@torch.library.custom_op("fastadapters::multi_adapter_cpp", mutates_args=())
def multi_adapter_cpp_op(y0: torch.Tensor, x: torch.Tensor, row_slot: torch.Tensor, down: torch.Tensor,
                         up: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor,
                         act_ids: torch.Tensor) -> torch.Tensor:
    """The C++ kernel as one opaque functional op, for torch.compile (no graph break per call)."""
    return multi_adapter_cpp(y0, x, row_slot, down, up, sizes, scales, act_ids)


@multi_adapter_cpp_op.register_fake
def _(y0, x, row_slot, down, up, sizes, scales, act_ids):
    return torch.empty_like(y0, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def multi_adapter(y0, x, row_slot, down, up, sizes, scales, act_ids, *, plan: MultiPlan | None = None,
                  backend: str | None = None, sizes_host=None, act_host=None, check: bool = True,
                  inplace: bool = False, opaque: bool = False):
    """y = y0 + per-row adapter deltas (see the module docstring). ``plan``: shared metadata from
    ``build_plan(row_slot, S)`` (built here when absent); ``sizes_host``/``act_host``: CPU copies of
    sizes/act_ids so the torch path needs no device read; ``check=False`` skips the value checks.
    ``inplace``: the caller owns ``y0`` and allows the result to be written into it (the ``cpp``
    backend does so; the others return a new tensor either way). ``opaque``: the ``cpp`` backend runs
    as its functional custom op (one op a graph capture or a tracer records), as under torch.compile."""
    if check:
        # reading the values syncs with the host, which CUDA-graph capture forbids: under capture
        # only shapes and dtypes are checked (the kernels clamp sizes to R)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        check_multi_args(y0, x, row_slot, down, up, sizes, scales, act_ids,
                         check_values=plan is None and not capturing)
    name = dispatch.resolve(OP, backend, x.device)
    if name == "cpp":
        if opaque or torch.compiler.is_compiling():
            return multi_adapter_cpp_op(y0, x, row_slot, down, up, sizes, scales, act_ids)
        return multi_adapter_cpp(y0, x, row_slot, down, up, sizes, scales, act_ids, plan, sizes_host, act_host,
                                 inplace=inplace)
    return dispatch._IMPLS[OP][name](y0, x, row_slot, down, up, sizes, scales, act_ids, plan, sizes_host, act_host)
