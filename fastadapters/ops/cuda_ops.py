"""The CUDA C++ kernels of csrc/ as torch ops, with their fakes, CPU reference kernels and wrappers.

Ops (namespace ``fastadapters``). Their schemas are defined *here* (torch.library), not in C++, so
that schema, fake (meta) kernel and CPU kernel exist -- and ``torch.compile`` / ``opcheck`` work --
whether or not the extension was built; the extension (csrc/ops.cpp) registers only the CUDA
kernels, loaded on first use by ``fastadapters._ext.load_extension()``::

    cuda_multi_adapter(Tensor y0, Tensor x, Tensor sorted_rows, Tensor seg_starts, Tensor seg_slots,
                       Tensor down, Tensor up, Tensor sizes, Tensor scales, Tensor act_ids) -> Tensor
    cuda_bottleneck_fwd(Tensor x, Tensor y0, Tensor down, Tensor up, Tensor scale, int act_id)
                       -> Tensor

Multi-adapter semantics (``multi_adapter_ref`` states them in plain torch)::

    y0 (M, N), x (M, K), row_slot (M,) int32, down (S, R, K), up (S, N, R),
    sizes (S,) int32, scales (S,) fp32, act_ids (S,) int32
    for m in range(M):
        s = row_slot[m]
        if s < 0: y[m] = y0[m]                                       # base row: no work
        else:
            r = sizes[s]
            h = act[act_ids[s]](down[s, :r, :] @ x[m])                 # fp32, (r,)
            y[m] = y0[m] + scales[s] * up[s, :, :r] @ h                # fp32 accumulate, one rounding
    act ids: 0 identity (LoRA: down = A, up = B, scales = alpha / r), 1 tanh, 2 relu,
             3 gelu (exact erf), 4 silu, 5 sigmoid

The CUDA op takes, instead of row_slot, the segment metadata of ``multi_adapter_meta`` (rows
grouped by slot; contract in csrc/multi_adapter.cuh), computed once per forward on the device and
shared by all layers. Bottleneck forward: ``y = y0 + scale * up @ act(down @ x)`` for one adapter,
down (b, K), up (N, b); the output placement passes ``y0 = x``.

On CPU tensors both ops run the plain-torch reference (fp32 accumulation, fp64 for fp64 inputs);
that is the path the tests use here, and what the fakes are checked against.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "ACT_NAMES", "MultiAdapterMeta", "multi_adapter_meta", "check_multi_adapter_meta",
    "multi_adapter_ref", "multi_adapter_cuda", "bottleneck_fwd_ref", "bottleneck_fwd_cuda",
    "act_id_of", "MULTI_ADAPTER_SCHEMA", "BOTTLENECK_FWD_SCHEMA",
]

NAMESPACE = "fastadapters"
MULTI_ADAPTER_SCHEMA = ("cuda_multi_adapter(Tensor y0, Tensor x, Tensor sorted_rows, "
                        "Tensor seg_starts, Tensor seg_slots, Tensor down, Tensor up, "
                        "Tensor sizes, Tensor scales, Tensor act_ids) -> Tensor")
BOTTLENECK_FWD_SCHEMA = ("cuda_bottleneck_fwd(Tensor x, Tensor y0, Tensor down, Tensor up, "
                         "Tensor scale, int act_id) -> Tensor")

# Activation ids shared with csrc/adapter_common.cuh and ops.bottleneck.ACT_IDS.
ACT_NAMES = ("identity", "tanh", "relu", "gelu", "silu", "sigmoid")
_ACT_FNS = (None, torch.tanh, F.relu, F.gelu, F.silu, torch.sigmoid)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REF_DTYPES = KERNEL_DTYPES + (torch.float64,)


def act_id_of(act: str | int) -> int:
    """Activation id from a name ("swish" = silu) or an id; raises naming the valid choices."""
    if isinstance(act, str):
        name = "silu" if act == "swish" else act
        if name not in ACT_NAMES:
            raise ValueError(f"act: got {act!r}; valid: {', '.join(ACT_NAMES)}, swish")
        return ACT_NAMES.index(name)
    if isinstance(act, bool) or not isinstance(act, int) or not 0 <= act < len(ACT_NAMES):
        raise ValueError(f"act: got {act!r}; expected a name or an id in 0..{len(ACT_NAMES) - 1}")
    return act


# ---------------------------------------------------------------------------------------------
# argument checks (shape / dtype / device only: usable on fake tensors, no host sync)


def _shape_error(name: str, symbols: str, expected: tuple, got: tuple) -> ValueError:
    return ValueError(f"expected {name} of shape {symbols} = {tuple(expected)}, got {tuple(got)}")


def _check_shape(name: str, t: torch.Tensor, symbols: str, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise _shape_error(name, symbols, expected, tuple(t.shape))


def _check_dim(name: str, t: torch.Tensor, dim: int, symbols: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a tensor {symbols}, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"expected {name} with {dim} dimensions {symbols}, got shape {tuple(t.shape)}")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"expected {name} of dtype {dtype}, got {t.dtype}")


def _check_devices(named: dict[str, torch.Tensor], ref: str) -> None:
    dev = named[ref].device
    for name, t in named.items():
        if t.device != dev:
            raise ValueError(f"expected {name} on {dev} (the device of {ref}), got {t.device}")


def _check_float_dtypes(x: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    allowed = KERNEL_DTYPES if x.device.type == "cuda" else _REF_DTYPES
    if x.dtype not in allowed:
        raise ValueError(f"expected x of dtype {' / '.join(str(d) for d in allowed)}, got {x.dtype}")
    for name, t in others.items():
        _check_dtype(name, t, x.dtype)


def _check_multi_args(y0, x, down, up, sizes, scales, act_ids) -> tuple[int, int, int, int, int]:
    """Checks shapes, dtypes and devices; returns (M, N, K, S, R)."""
    _check_dim("x", x, 2, "(M, K)")
    _check_dim("down", down, 3, "(S, R, K)")
    _check_dim("up", up, 3, "(S, N, R)")
    M, K = x.shape
    S, R = down.shape[0], down.shape[1]
    N = up.shape[1]
    _check_shape("down", down, "(S, R, K)", (S, R, K))
    _check_shape("up", up, "(S, N, R)", (S, N, R))
    _check_dim("y0", y0, 2, "(M, N)")
    _check_shape("y0", y0, "(M, N)", (M, N))
    for name, t in (("sizes", sizes), ("scales", scales), ("act_ids", act_ids)):
        _check_dim(name, t, 1, "(S,)")
        _check_shape(name, t, "(S,)", (S,))
    _check_float_dtypes(x, {"y0": y0, "down": down, "up": up})
    _check_dtype("sizes", sizes, torch.int32)
    _check_dtype("act_ids", act_ids, torch.int32)
    _check_dtype("scales", scales, torch.float32)
    _check_devices({"x": x, "y0": y0, "down": down, "up": up, "sizes": sizes, "scales": scales,
                    "act_ids": act_ids}, "x")
    return M, N, K, S, R


class MultiAdapterMeta(NamedTuple):
    """Rows grouped by slot (contract in csrc/multi_adapter.cuh); G = min(M, S + 1) segments."""

    sorted_rows: torch.Tensor  # (M,) int32, rows of one slot contiguous, base rows last
    seg_starts: torch.Tensor   # (G + 1,) int32, segment g = sorted positions [starts[g], starts[g+1])
    seg_slots: torch.Tensor    # (G,) int32, slot of segment g, -1 for base rows / unused segments


def multi_adapter_meta(row_slot: torch.Tensor, num_slots: int,
                       out: MultiAdapterMeta | None = None) -> MultiAdapterMeta:
    """Segment metadata of a batch, on row_slot's device, with no host sync (CUDA-graph safe).

    Rows are stably sorted by slot; rows with row_slot < 0 (or >= num_slots, treated as base)
    form the last segment with slot -1; segments past the distinct slots are empty (start = M).
    The number of segments G = min(M, num_slots + 1) depends on the shapes only.
    ``out``: metadata of a previous call with the same (M, num_slots), refilled in place and
    returned (a CUDA graph captured with those tensors then replays the new mix).
    """
    _check_dim("row_slot", row_slot, 1, "(M,)")
    if row_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expected row_slot of dtype torch.int32 (or int64), got {row_slot.dtype}")
    if int(num_slots) < 0:
        raise ValueError(f"num_slots: expected >= 0, got {num_slots}")
    M = row_slot.shape[0]
    S = int(num_slots)
    G = min(M, S + 1)
    dev = row_slot.device
    slot = row_slot.long()
    key = torch.where((slot >= 0) & (slot < S), slot, torch.full_like(slot, S))
    sorted_key, order = torch.sort(key, stable=True)
    is_start = torch.ones(M, dtype=torch.bool, device=dev)
    if M > 1:
        is_start[1:] = sorted_key[1:] != sorted_key[:-1]
    seg_id = torch.cumsum(is_start.long(), 0) - 1  # non-decreasing, 0 .. distinct - 1
    starts = torch.searchsorted(seg_id, torch.arange(G + 1, device=dev, dtype=torch.long))
    first = sorted_key.gather(0, starts[:G].clamp(max=max(M - 1, 0))) if M > 0 else starts[:0]
    seg_slots = torch.where((starts[:G] < M) & (first < S), first, torch.full_like(first, -1))
    meta = MultiAdapterMeta(order.to(torch.int32), starts.to(torch.int32), seg_slots.to(torch.int32))
    if out is None:
        return meta
    for name, dst, src in zip(MultiAdapterMeta._fields, out, meta):
        if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
            raise ValueError(f"multi_adapter_meta(out=...): {name} was built for another (M, S) or "
                             f"device: expected {tuple(src.shape)} {src.dtype} on {src.device}, got "
                             f"{tuple(dst.shape)} {dst.dtype} on {dst.device}")
        dst.copy_(src)
    return out


def check_multi_adapter_meta(meta: MultiAdapterMeta, M: int, S: int) -> None:
    """Validates the metadata contract on concrete tensors (host sync; tests and the CPU path).
    Raises ValueError naming the first violation."""
    sorted_rows, seg_starts, seg_slots = meta
    G = seg_slots.shape[0]
    _check_shape("sorted_rows", sorted_rows, "(M,)", (M,))
    _check_shape("seg_starts", seg_starts, "(G + 1,)", (G + 1,))
    for name, t in zip(MultiAdapterMeta._fields, meta):
        _check_dtype(name, t, torch.int32)
    rows = sorted_rows.long().cpu()
    if not torch.equal(torch.sort(rows).values, torch.arange(M)):
        raise ValueError(f"sorted_rows: expected a permutation of 0..{M - 1}, got {rows.tolist()}")
    st = seg_starts.long().cpu()
    if st[0].item() != 0 or st[-1].item() != M or bool((st[1:] < st[:-1]).any()):
        raise ValueError(f"seg_starts: expected non-decreasing from 0 to M={M}, got {st.tolist()}")
    sl = seg_slots.long().cpu()
    nonempty = st[1:] > st[:-1]
    used = sl[nonempty & (sl >= 0) & (sl < S)]
    if used.unique().numel() != used.numel():
        raise ValueError(f"seg_slots: a slot appears in more than one segment: {sl.tolist()}")


def _row_slot_from_meta(meta: MultiAdapterMeta, M: int, S: int) -> torch.Tensor:
    """The per-row slot a valid metadata triple encodes (out-of-range slots -> -1)."""
    sorted_rows, seg_starts, seg_slots = (t.long() for t in meta)
    G = seg_slots.shape[0]
    row_slot = torch.full((M,), -1, dtype=torch.long, device=sorted_rows.device)
    if M == 0 or G == 0:
        return row_slot.to(torch.int32)
    pos = torch.arange(M, device=sorted_rows.device)
    seg_of_pos = torch.searchsorted(seg_starts[1:].contiguous(), pos, right=True).clamp(max=G - 1)
    slot_at_pos = seg_slots[seg_of_pos]
    slot_at_pos = torch.where((slot_at_pos >= 0) & (slot_at_pos < S), slot_at_pos, -1)
    row_slot[sorted_rows] = slot_at_pos
    return row_slot.to(torch.int32)


def _act_rows(h: torch.Tensor, act_rows: torch.Tensor) -> torch.Tensor:
    """Applies activation act_rows[m] to row m of h (M, R)."""
    out = h
    for i in range(1, len(ACT_NAMES)):
        out = torch.where((act_rows == i)[:, None], _ACT_FNS[i](h), out)
    return out


def multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, act_ids) -> torch.Tensor:
    """The multi-adapter semantics (module docstring) in plain torch, as a gathered batched matmul.

    Accumulates in fp32 (fp64 when the inputs are fp64) and rounds once to y0's dtype. Checks the
    values (host sync): row_slot < S, 0 <= sizes <= R, act ids in 0..5.
    """
    M, N, K, S, R = _check_multi_args(y0, x, down, up, sizes, scales, act_ids)
    _check_dim("row_slot", row_slot, 1, "(M,)")
    _check_shape("row_slot", row_slot, "(M,)", (M,))
    slot = row_slot.long()
    if M and int(slot.max()) >= S:
        m = int(torch.argmax((slot >= S).to(torch.int8)))
        raise ValueError(f"row_slot[{m}] = {int(slot[m])}, but the store has {S} slots")
    if S and (int(sizes.min()) < 0 or int(sizes.max()) > R):
        raise ValueError(f"sizes: expected values in 0..R={R}, got {sizes.tolist()}")
    if S and (int(act_ids.min()) < 0 or int(act_ids.max()) >= len(ACT_NAMES)):
        raise ValueError(f"act_ids: expected values in 0..{len(ACT_NAMES) - 1}, got {act_ids.tolist()}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    active = slot >= 0
    s = slot.clamp(min=0)
    rank_ok = torch.arange(R, device=x.device)[None, :] < sizes.long()[s][:, None]  # (M, R)
    d = down[s].to(acc)                                                          # (M, R, K)
    h = torch.bmm(d, x.to(acc)[:, :, None]).squeeze(-1)                          # (M, R)
    h = torch.where(rank_ok, _act_rows(h, act_ids.long()[s]), torch.zeros((), dtype=acc, device=x.device))
    u = torch.where(rank_ok[:, None, :], up[s].to(acc), torch.zeros((), dtype=acc, device=x.device))
    delta = torch.bmm(u, h[:, :, None]).squeeze(-1) * scales.to(acc)[s][:, None]  # (M, N)
    y = torch.where(active[:, None], y0.to(acc) + delta, y0.to(acc))
    return y.to(y0.dtype)


def bottleneck_fwd_ref(x, y0, down, up, scale, act_id: int) -> torch.Tensor:
    """y = y0 + scale * up @ act(down @ x) for one bottleneck adapter, fp32 (fp64) accumulation,
    one rounding to y0's dtype. x (M, K), y0 (M, N), down (b, K), up (N, b), scale 1 element."""
    _check_bottleneck_args(x, y0, down, up, scale, act_id)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(acc) @ down.to(acc).t()
    if act_id:
        h = _ACT_FNS[act_id](h)
    return (y0.to(acc) + scale.reshape(()).to(acc) * (h @ up.to(acc).t())).to(y0.dtype)


def _check_bottleneck_args(x, y0, down, up, scale, act_id) -> tuple[int, int, int, int]:
    _check_dim("x", x, 2, "(M, K)")
    _check_dim("down", down, 2, "(b, K)")
    _check_dim("up", up, 2, "(N, b)")
    M, K = x.shape
    b, N = down.shape[0], up.shape[0]
    _check_shape("down", down, "(b, K)", (b, K))
    _check_shape("up", up, "(N, b)", (N, b))
    _check_dim("y0", y0, 2, "(M, N)")
    _check_shape("y0", y0, "(M, N)", (M, N))
    if scale.numel() != 1:
        raise ValueError(f"expected scale with 1 element, got shape {tuple(scale.shape)}")
    _check_dtype("scale", scale, torch.float32)
    act_id_of(int(act_id))
    _check_float_dtypes(x, {"y0": y0, "down": down, "up": up})
    _check_devices({"x": x, "y0": y0, "down": down, "up": up, "scale": scale}, "x")
    return M, N, K, b


# ---------------------------------------------------------------------------------------------
# op registration: schema + fake + CPU reference kernel here; CUDA kernel from the extension

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def _op_defined(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _multi_adapter_cpu(y0, x, sorted_rows, seg_starts, seg_slots, down, up, sizes, scales, act_ids):
    M, N, K, S, R = _check_multi_args(y0, x, down, up, sizes, scales, act_ids)
    meta = MultiAdapterMeta(sorted_rows, seg_starts, seg_slots)
    check_multi_adapter_meta(meta, M, S)
    row_slot = _row_slot_from_meta(meta, M, S)
    return multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, act_ids)


def _multi_adapter_fake(y0, x, sorted_rows, seg_starts, seg_slots, down, up, sizes, scales, act_ids):
    M, N, K, S, R = _check_multi_args(y0, x, down, up, sizes, scales, act_ids)
    _check_shape("sorted_rows", sorted_rows, "(M,)", (M,))
    _check_dim("seg_slots", seg_slots, 1, "(G,)")
    _check_shape("seg_starts", seg_starts, "(G + 1,)", (seg_slots.shape[0] + 1,))
    if M > 0 and seg_slots.shape[0] == 0:
        raise ValueError(f"expected at least one segment for M = {M} rows, got seg_slots of shape (0,)")
    return y0.new_empty((M, N))


def _bottleneck_fwd_cpu(x, y0, down, up, scale, act_id):
    return bottleneck_fwd_ref(x, y0, down, up, scale, act_id)


def _bottleneck_fwd_fake(x, y0, down, up, scale, act_id):
    M, N, K, b = _check_bottleneck_args(x, y0, down, up, scale, act_id)
    return y0.new_empty((M, N))


def _register() -> None:
    for schema, cpu, fake in ((MULTI_ADAPTER_SCHEMA, _multi_adapter_cpu, _multi_adapter_fake),
                              (BOTTLENECK_FWD_SCHEMA, _bottleneck_fwd_cpu, _bottleneck_fwd_fake)):
        name = schema.split("(", 1)[0]
        if _op_defined(name):  # e.g. a second copy of this module: keep the first registration
            continue
        _LIB.define(schema)
        _LIB.impl(name, cpu, "CPU")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)


_register()


# ---------------------------------------------------------------------------------------------
# wrappers


def _ensure_kernels(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        from .._ext import load_extension

        load_extension()


def multi_adapter_cuda(y0, x, row_slot, down, up, sizes, scales, act_ids,
                       meta: MultiAdapterMeta | None = None) -> torch.Tensor:
    """``fastadapters::cuda_multi_adapter`` with the lead's signature (see the module docstring).

    ``meta``: the batch's ``multi_adapter_meta(row_slot, S)``, computed once per forward and shared
    by all layers; computed here when omitted. Returns a new (M, N) tensor (never aliases x / y0).
    CUDA tensors run the csrc kernel (built or JIT-built on first use), CPU tensors the reference.
    """
    M, N, K, S, R = _check_multi_args(y0, x, down, up, sizes, scales, act_ids)
    # the kernel takes any row stride but needs each row contiguous (a transposed view is copied)
    x = x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()
    y0 = y0 if y0.shape[1] <= 1 or y0.stride(1) == 1 else y0.contiguous()
    if meta is None:
        _check_dim("row_slot", row_slot, 1, "(M,)")
        _check_shape("row_slot", row_slot, "(M,)", (M,))
        meta = multi_adapter_meta(row_slot, S)
    _ensure_kernels(x)
    return torch.ops.fastadapters.cuda_multi_adapter(y0, x, *meta, down, up, sizes, scales, act_ids)


def bottleneck_fwd_cuda(x, down, up, scale, act: str | int = "tanh", placement: str = "parallel",
                        y0: torch.Tensor | None = None) -> torch.Tensor:
    """Fused bottleneck forward for one adapter: ``fastadapters::cuda_bottleneck_fwd``.

    placement "parallel": y = y0 + scale * up @ act(down @ x)   (y0 = W x + b, given)
    placement "output":   y = x + scale * up @ act(down @ x)    (x = h = W x' + b; y0 must be None)
    x (..., K), down (b, K), up (N, b); scale a float or a 1-element tensor (a learned scaling
    stays on the device: no host sync). Returns a new tensor of y0's (or x's) shape.
    """
    if placement not in ("parallel", "output"):
        raise ValueError(f"placement: got {placement!r}; valid: parallel, output")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"expected x of shape (..., K), got {getattr(x, 'shape', type(x))}")
    act_id = act_id_of(act)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if placement == "output":
        if y0 is not None:
            raise ValueError("placement 'output' adds the branch to x itself: pass y0=None")
        y02 = x2
    else:
        if y0 is None:
            raise ValueError("placement 'parallel' needs y0 (the base output W x + b)")
        if tuple(y0.shape[:-1]) != tuple(lead):
            raise ValueError(f"expected y0 of shape {tuple(lead) + ('N',)}, got {tuple(y0.shape)}")
        y02 = y0.reshape(-1, y0.shape[-1])
    if isinstance(scale, torch.Tensor):
        scale_t = scale.detach().to(device=x.device, dtype=torch.float32).reshape(-1)
    else:
        scale_t = torch.full((1,), float(scale), dtype=torch.float32, device=x.device)
    _check_bottleneck_args(x2, y02, down, up, scale_t, act_id)
    _ensure_kernels(x2)
    y = torch.ops.fastadapters.cuda_bottleneck_fwd(x2, y02, down, up, scale_t, act_id)
    return y.reshape(*lead, y.shape[-1])
