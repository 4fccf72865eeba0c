"""Triton kernels for mixed-adapter batches: every row runs its own LoRA or bottleneck adapter.

    h[m]  = scales[s] * act_{act_ids[s]}(down[s, :r, :] @ x[m])        s = row slot, r = sizes[s]
    y[m]  = y0[m] + up[s, :, :r] @ h[m]                                 base rows (s < 0): y0

Each path is a shrink kernel writing h (M, R) in fp32, then an expand kernel adding into y:

  segmented (prefill): rows sorted by slot, cut into tiles of BM rows of one slot
      _seg_shrink_kernel   grid (tiles, cdiv(R, BR))   tile x down-slice, tl.dot over K
      _seg_expand_kernel   grid (tiles, cdiv(N, BN))   tile x up-slice,   tl.dot over r < size
  gather (decode): one program per slot walks that slot's rows, so each adapter's weights are read
  once per step (as long as its rows fit in BMG, which the launcher sizes to the batch)
      _gather_shrink_kernel  grid (S, cdiv(R, BR))     broadcast-multiply-reduce, no padding to 16
      _gather_expand_kernel  grid (S, cdiv(N, BN))

Both are CUDA-graph friendly: the grids depend on (M, N, R, S) only, every tile/slot reads its
segment, size and activation from device tensors at run time (loops run to ``sizes[s]``, so a
rank-4 adapter costs rank-4 work beside a rank-64 one; size 0 or an unused tile returns at once),
and nothing syncs with the host. The metadata (``sorted_rows``, ``seg_*``, ``tile_*``) comes from
``fastadapters.ops.multi.build_plan``. Activation ids follow ``fastadapters.ops.bottleneck.ACT_IDS``
(0 identity, 1 tanh, 2 relu, 3 gelu, 4 silu, 5 sigmoid) and are runtime values: one launch mixes
LoRA and bottleneck adapters. Accumulation is fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["multi_adapter_launch", "KERNELS", "compile_offline"]


# The CPU interpreter (TRITON_INTERPRET=1, read at import) keeps bf16 as raw uint16 and multiplies it
# as integers in tl.dot (triton 3.6 - 3.9); there bf16 operands are widened to fp32 first (exact:
# bf16 products are exact in fp32, as on the tensor cores). Same rule as _common.mma.
_INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation on the tensor cores; interpreter-safe for bf16."""
    if _INTERPRETING:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _act_by_id(h, act_id):
    """act(h) for fp32 h with a runtime activation id (ids as ACT_IDS)."""
    sg = 1.0 / (1.0 + tl.exp(-h))
    th = 2.0 / (1.0 + tl.exp(-2.0 * h)) - 1.0
    out = tl.where(act_id == 1, th, h)
    out = tl.where(act_id == 2, tl.maximum(h, 0.0), out)
    out = tl.where(act_id == 3, 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476)), out)
    out = tl.where(act_id == 4, h * sg, out)
    out = tl.where(act_id == 5, sg, out)
    return out


# ----------------------------------------------------------------------------------------------
# segmented path (prefill): tensor-core tiles of BM rows that share one adapter
# ----------------------------------------------------------------------------------------------

@triton.jit
def _seg_shrink_kernel(
    x_ptr, down_ptr, h_ptr,
    sorted_rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
    sizes_ptr, scales_ptr, act_ptr,
    K, R,
    stride_xm, stride_xk, stride_ds, stride_dr, stride_dk, stride_hm, stride_hr,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    t = tl.program_id(0)
    r0 = tl.program_id(1) * BR
    slot = tl.load(tile_slot_ptr + t)
    if slot < 0:
        return
    size = tl.minimum(tl.load(sizes_ptr + slot), R)  # as the C++ kernel: never past the storage
    if r0 >= size:
        return
    start = tl.load(tile_start_ptr + t)
    n_rows = tl.load(tile_len_ptr + t)
    lm = tl.arange(0, BM)
    row_ok = lm < n_rows
    rows = tl.load(sorted_rows_ptr + start + lm, mask=row_ok, other=0).to(tl.int64)
    rr = r0 + tl.arange(0, BR)
    r_ok = rr < size
    rk = tl.arange(0, BK)
    d_base = down_ptr + slot.to(tl.int64) * stride_ds
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dt = tl.load(d_base + rr[None, :] * stride_dr + kk[:, None] * stride_dk,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BR)
        acc = _mma(xt.to(dt.dtype), dt, acc, DOT_PREC)
    h = _act_by_id(acc, tl.load(act_ptr + slot)) * tl.load(scales_ptr + slot)
    tl.store(h_ptr + rows[:, None] * stride_hm + rr[None, :] * stride_hr, h,
             mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _seg_expand_kernel(
    h_ptr, up_ptr, y_ptr,
    sorted_rows_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, sizes_ptr,
    N, R,
    stride_hm, stride_hr, stride_us, stride_un, stride_ur, stride_ym, stride_yn,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    t = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    slot = tl.load(tile_slot_ptr + t)
    if slot < 0:
        return
    size = tl.minimum(tl.load(sizes_ptr + slot), R)  # as the C++ kernel: never past the storage
    if size == 0:
        return
    start = tl.load(tile_start_ptr + t)
    n_rows = tl.load(tile_len_ptr + t)
    lm = tl.arange(0, BM)
    row_ok = lm < n_rows
    rows = tl.load(sorted_rows_ptr + start + lm, mask=row_ok, other=0).to(tl.int64)
    nn = n0 + tl.arange(0, BN)
    n_ok = nn < N
    u_base = up_ptr + slot.to(tl.int64) * stride_us
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, size, BR):
        rr = r0 + tl.arange(0, BR)
        r_ok = rr < size
        ht = tl.load(h_ptr + rows[:, None] * stride_hm + rr[None, :] * stride_hr,
                     mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        ut = tl.load(u_base + nn[None, :] * stride_un + rr[:, None] * stride_ur,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (BR, BN)
        acc = _mma(ht.to(ut.dtype), ut, acc, DOT_PREC)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + nn[None, :] * stride_yn
    ym = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=ym, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=ym)


# ----------------------------------------------------------------------------------------------
# gather path (decode): one program per adapter slot, its rows gathered, weights read once
# ----------------------------------------------------------------------------------------------

@triton.jit
def _gather_shrink_kernel(
    x_ptr, down_ptr, h_ptr,
    sorted_rows_ptr, seg_start_ptr, seg_count_ptr,
    sizes_ptr, scales_ptr, act_ptr,
    K, R,
    stride_xm, stride_xk, stride_ds, stride_dr, stride_dk, stride_hm, stride_hr,
    BMG: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    slot = tl.program_id(0)
    r0 = tl.program_id(1) * BR
    count = tl.load(seg_count_ptr + slot)
    size = tl.minimum(tl.load(sizes_ptr + slot), R)  # as the C++ kernel: never past the storage
    if (count == 0) | (r0 >= size):
        return
    start = tl.load(seg_start_ptr + slot)
    rr = r0 + tl.arange(0, BR)
    r_ok = rr < size
    rk = tl.arange(0, BK)
    act_id = tl.load(act_ptr + slot)
    scale = tl.load(scales_ptr + slot)
    d_base = down_ptr + slot.to(tl.int64) * stride_ds
    for m0 in range(0, count, BMG):
        lm = m0 + tl.arange(0, BMG)
        row_ok = lm < count
        rows = tl.load(sorted_rows_ptr + start + lm, mask=row_ok, other=0).to(tl.int64)
        acc = tl.zeros((BMG, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_ok = kk < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            dt = tl.load(d_base + rr[:, None] * stride_dr + kk[None, :] * stride_dk,
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (BR, BK)
            acc += tl.sum(xt[:, None, :] * dt[None, :, :], axis=2)
        h = _act_by_id(acc, act_id) * scale
        tl.store(h_ptr + rows[:, None] * stride_hm + rr[None, :] * stride_hr, h,
                 mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _gather_expand_kernel(
    h_ptr, up_ptr, y_ptr,
    sorted_rows_ptr, seg_start_ptr, seg_count_ptr, sizes_ptr,
    N, R,
    stride_hm, stride_hr, stride_us, stride_un, stride_ur, stride_ym, stride_yn,
    BMG: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    slot = tl.program_id(0)
    n0 = tl.program_id(1) * BN
    count = tl.load(seg_count_ptr + slot)
    size = tl.minimum(tl.load(sizes_ptr + slot), R)  # as the C++ kernel: never past the storage
    if (count == 0) | (size == 0):
        return
    start = tl.load(seg_start_ptr + slot)
    nn = n0 + tl.arange(0, BN)
    n_ok = nn < N
    u_base = up_ptr + slot.to(tl.int64) * stride_us
    for m0 in range(0, count, BMG):
        lm = m0 + tl.arange(0, BMG)
        row_ok = lm < count
        rows = tl.load(sorted_rows_ptr + start + lm, mask=row_ok, other=0).to(tl.int64)
        acc = tl.zeros((BMG, BN), dtype=tl.float32)
        for r0 in range(0, size, BR):
            rr = r0 + tl.arange(0, BR)
            r_ok = rr < size
            ht = tl.load(h_ptr + rows[:, None] * stride_hm + rr[None, :] * stride_hr,
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            ut = tl.load(u_base + nn[:, None] * stride_un + rr[None, :] * stride_ur,
                         mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # (BN, BR)
            acc += tl.sum(ht[:, None, :] * ut[None, :, :], axis=2)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + nn[None, :] * stride_yn
        ym = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=ym, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=ym)


KERNELS = {
    "seg_shrink": _seg_shrink_kernel,
    "seg_expand": _seg_expand_kernel,
    "gather_shrink": _gather_shrink_kernel,
    "gather_expand": _gather_expand_kernel,
}

# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------

SEG_BN, SEG_BK = 64, 64
SEG_WARPS = 4
#: pipeline stages of every multi-adapter launch (the offline compile uses the same)
STAGES = 3


def seg_rank_block(r: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Rank slice of a segmented shrink program: the padded rank up to 64, so X is read once per
    tile for ranks up to 64 (16-wide slices re-read it R / 16 times). fp32 keeps 16: its IEEE dot
    runs on the FMA units and spilled 64 B at 32 and 972 B at 64 (sm_80)."""
    cap = 16 if dtype == torch.float32 else 64
    return min(cap, max(16, triton.next_power_of_2(int(r))))


SEG_BR_EXPAND = 16  # the expand loops over the adapter's own rank in 16-wide steps


def seg_shrink_blocks(dtype: torch.dtype):
    """Every rank slice the segmented shrink may take in ``dtype`` (for the compile specs)."""
    return tuple(sorted({seg_rank_block(r, dtype) for r in (1, 32, 64)}))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


GATHER_ROW_BLOCKS = (8, 32)
GATHER_BN, GATHER_BR = 64, 16
#: (BK of the shrink, warps) per row block: the (BMG, BR, BK) broadcast product of the shrink and
#: the (BMG, BN, BR) one of the expand stay near 32 fp32 registers a thread (no spills)
GATHER_CFG = {8: (32, 4), 32: (16, 8)}


def gather_rows_block(m: int) -> int:
    """Rows a gather program holds at once (8 for batches up to 8 rows, else 32): an adapter's
    weights are read once per step as long as at most that many rows share it."""
    return GATHER_ROW_BLOCKS[0] if m <= GATHER_ROW_BLOCKS[0] else GATHER_ROW_BLOCKS[1]


def multi_adapter_launch(y0, x, sorted_rows, seg_start, seg_count, tile_slot, tile_start, tile_len,
                         down, up, sizes, scales, act_ids, block_m: int, gather: bool):
    """y = y0 + deltas (semantics in the module docstring); returns a new tensor."""
    from ._common import device_guard

    m, k = x.shape
    n = y0.shape[1]
    s, r = down.shape[0], down.shape[1]
    y = y0.clone()
    if m == 0 or s == 0 or r == 0:
        return y
    h = torch.empty((m, r), device=x.device, dtype=torch.float32)
    with device_guard(x):
        if gather:
            bmg = gather_rows_block(m)
            bk, warps = GATHER_CFG[bmg]
            _gather_shrink_kernel[(s, triton.cdiv(r, GATHER_BR))](
                x, down, h, sorted_rows, seg_start, seg_count, sizes, scales, act_ids, k, r,
                x.stride(0), x.stride(1), down.stride(0), down.stride(1), down.stride(2), h.stride(0), h.stride(1),
                BMG=bmg, BR=GATHER_BR, BK=bk, num_warps=warps, num_stages=STAGES)
            _gather_expand_kernel[(s, triton.cdiv(n, GATHER_BN))](
                h, up, y, sorted_rows, seg_start, seg_count, sizes, n, r,
                h.stride(0), h.stride(1), up.stride(0), up.stride(1), up.stride(2), y.stride(0), y.stride(1),
                BMG=bmg, BN=GATHER_BN, BR=GATHER_BR, num_warps=warps, num_stages=STAGES)
            return y
        tiles = tile_slot.shape[0]
        br = seg_rank_block(r, down.dtype)
        _seg_shrink_kernel[(tiles, triton.cdiv(r, br))](
            x, down, h, sorted_rows, tile_slot, tile_start, tile_len, sizes, scales, act_ids, k, r,
            x.stride(0), x.stride(1), down.stride(0), down.stride(1), down.stride(2), h.stride(0), h.stride(1),
            DOT_PREC=_dot_precision(down.dtype), BM=block_m, BR=br, BK=SEG_BK, num_warps=SEG_WARPS,
            num_stages=STAGES)
        _seg_expand_kernel[(tiles, triton.cdiv(n, SEG_BN))](
            h, up, y, sorted_rows, tile_slot, tile_start, tile_len, sizes, n, r,
            h.stride(0), h.stride(1), up.stride(0), up.stride(1), up.stride(2), y.stride(0), y.stride(1),
            DOT_PREC=_dot_precision(up.dtype), BM=block_m, BN=SEG_BN, BR=SEG_BR_EXPAND, num_warps=SEG_WARPS,
            num_stages=STAGES)
    return y


# ----------------------------------------------------------------------------------------------
# offline compile (no GPU needed): what the tests check for sm_80 / sm_90
# ----------------------------------------------------------------------------------------------

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def shipped_configs(dtype: torch.dtype = torch.bfloat16, block_m: int = 64):
    """(name, kernel, signature, constexprs, num_warps) of every kernel configuration the launcher
    uses (compile with ``num_stages=STAGES``, as it launches)."""
    w = _TL[dtype]
    prec = _dot_precision(dtype)
    ptr = {"x_ptr": w, "down_ptr": w, "up_ptr": w, "y_ptr": w, "h_ptr": "fp32", "scales_ptr": "fp32"}
    out = []
    specs = [(f"seg_shrink_r{br}", _seg_shrink_kernel, dict(DOT_PREC=prec, BM=block_m, BR=br, BK=SEG_BK), SEG_WARPS)
             for br in seg_shrink_blocks(dtype)]
    specs.append(("seg_expand", _seg_expand_kernel, dict(DOT_PREC=prec, BM=block_m, BN=SEG_BN, BR=SEG_BR_EXPAND),
                  SEG_WARPS))
    for bmg in GATHER_ROW_BLOCKS:
        bk, warps = GATHER_CFG[bmg]
        specs += [
            (f"gather_shrink_bmg{bmg}", _gather_shrink_kernel, dict(BMG=bmg, BR=GATHER_BR, BK=bk), warps),
            (f"gather_expand_bmg{bmg}", _gather_expand_kernel, dict(BMG=bmg, BN=GATHER_BN, BR=GATHER_BR), warps),
        ]
    for name, fn, cx, warps in specs:
        sig = {}
        for a in fn.arg_names:
            if a in cx:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*" + ptr.get(a, "i32")
            else:
                sig[a] = "i32"
        out.append((name, fn, sig, cx, warps))
    return out


def shipped_kernel_specs(dtype: torch.dtype = torch.bfloat16):
    """``shipped_configs`` in the form of the other kernel modules' specs (the compile guard in
    tests/kernels/test_triton_compile.py): pointers 16-byte aligned, sizes and strides divisible
    by 16 except R, the row stride of h and unit strides specialised as the JIT does."""
    from ._common import make_signature

    w = _TL[dtype]
    ptr = {"x_ptr": w, "down_ptr": w, "up_ptr": w, "y_ptr": w, "h_ptr": "fp32", "scales_ptr": "fp32",
           "sorted_rows_ptr": "i32", "tile_slot_ptr": "i32", "tile_start_ptr": "i32", "tile_len_ptr": "i32",
           "seg_start_ptr": "i32", "seg_count_ptr": "i32", "sizes_ptr": "i32", "act_ptr": "i32"}
    out = []
    for name, fn, _sig, cx, warps in shipped_configs(dtype):
        unit = [a for a in ("stride_xk", "stride_dk", "stride_hr", "stride_ur", "stride_yn") if a in fn.arg_names]
        sig, consts, attrs = make_signature(fn, ptr, cx, w, unit)
        out.append(dict(name=name, fn=fn, dtype=dtype, signature=sig, constexprs=consts, attrs=attrs,
                        num_warps=warps, num_stages=STAGES, mma_sync_ok=False, gemm=name.startswith("seg_")))
    return out


def compile_offline(fn, signature: dict, constexprs: dict, cc: int, num_warps: int = 4, num_stages: int = STAGES):
    """Compile ``fn`` for CUDA compute capability ``cc`` without a GPU; returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
