"""Fused LoRA linear in Triton: frozen base GEMM + low-rank branch, forward and backward.

    Y = X·Wᵀ + b + s · act(dropout(X)·Aᵀ)·Bᵀ          (LoRA: act = identity)

The five kernels here are written for a general "adapter branch" P = dropout(X)·Aᵀ followed by an
elementwise activation, so the parallel bottleneck adapter (`bottleneck.py`) reuses them unchanged:

  _down_proj_kernel         P  = dropout(X)·Aᵀ                     (M, r) fp32, one pass over X
  _fused_up_kernel          Y  = X·Wᵀ + b + (s·act(P))·Bᵀ          the adapter term is one more
                                                                   tl.dot into the base accumulator:
                                                                   no (M, N) intermediate
  _rank_grad_kernel         G  = (dY·B) ⊙ act'(P)                  (M, r) fp32, and from the same
                            dB = s·dYᵀ·act(P)                      read of dY (fp32 atomics over
                            ds = Σ (dY·B) ⊙ act(P)                 row blocks; ds per row block)
  _input_grad_kernel        dX = dY·W + s·(G·A) ⊙ mask/(1-p)       one GEMM, LoRA term in epilogue
                            (or dX = R + ... with a residual R instead of dY·W, for series adapters)
  _down_weight_grad_kernel  dA = s·Gᵀ·dropout(X)                   split over M, fp32 atomics

Ranks up to 256 run in 64-wide rank slices: the GEMM kernels loop over them (16-wide in fp32),
the row-block kernels run one program per (row block, rank slice), so no kernel holds a
(rows, 256) tile (it asked for more shared memory than a block may have in fp32, and spilled).
When the row blocks are too few to fill the GPU (M = 2048 is 32 row blocks on 132 SMs), the down
projection also splits K and the LoRA rank gradient splits N, adding into a zeroed P / G.

The fp32 atomics (relaxed: `red`) make those sums and dB / dA order-dependent in the last bits;
under `torch.use_deterministic_algorithms(True)` the launchers split no reduction, use
per-row-block partials (dB) and one split (dA), and the results are bitwise reproducible.
Every launch runs under the tensors' CUDA device (`_common.device_guard`).
Dropout masks come from Philox (`_common.dropout_keep`) and are regenerated where needed.
Accumulation is fp32; X, W, A, B and Y are fp16, bf16 or fp32 (fp32 dots are IEEE unless
`torch.backends.cuda.matmul.allow_tf32` is set). The small (M, r) fp32 P / G tensors are the only
intermediates written to memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ACT_GELU,
    ACT_IDENTITY,
    BlockConfig,
    TRITON_DTYPE_NAMES,
    apply_act,
    apply_act_grad,
    check_dropout,
    check_dtype,
    check_index_range,
    check_philox_range,
    check_rank,
    check_tensor,
    device_guard,
    dot_precision,
    dropout_keep,
    load_scale,
    mma,
    make_signature,
    num_sms,
    rank_block,
    scale_args,
)

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])  # one compile for every seed
def _down_proj_kernel(
    x_ptr, a_ptr, p_out_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak,
    seed, p, inv_keep,
    HAS_DROPOUT: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # program (row block, BR-wide rank slice, K split); K splits add into a zeroed P (relaxed atomics)
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (kk[None, :] < k_end), other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, kk, K, p), x, 0.0).to(x.dtype)
        a = tl.load(
            a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
            mask=(rr[None, :] < R) & (kk[:, None] < k_end), other=0.0,
        )
        acc = mma(x, a, acc, DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    ptrs = p_out_ptr + rm[:, None] * R + rr[None, :]
    out_mask = (rm[:, None] < M) & (rr[None, :] < R)
    if USE_ATOMIC:
        tl.atomic_add(ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=out_mask)


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # L2-friendly order: GROUP_M row blocks share each column block of the weight
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fused_up_kernel(
    x_ptr, w_ptr, bias_ptr, p_in_ptr, b_ptr, y_ptr, scale_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_ym, stride_yn,
    scale_val,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_IS_PTR: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, BR)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_ok[:, None] & (kk[None, :] < K), other=0.0,
        )
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
            mask=n_ok[None, :] & (kk[:, None] < K), other=0.0,
        )
        acc = mma(x, w, acc, DOT_PREC)
    # adapter term into the same accumulator: acc += (s * act(P)) · Bᵀ, in BR-wide rank slices
    # (BR <= 64) so a rank-256 branch needs no (BM, 256) operand in registers or shared memory
    s = load_scale(scale_ptr, scale_val, SCALE_IS_PTR)
    for r0 in range(0, R, BR):
        rs = r0 + rr
        r_ok = rs < R
        pt = tl.load(p_in_ptr + rm[:, None] * R + rs[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        h = tl.where(r_ok[None, :], apply_act(pt, ACT) * s, 0.0).to(y_ptr.dtype.element_ty)
        bt = tl.load(
            b_ptr + rn[None, :] * stride_bn + rs[:, None] * stride_br,
            mask=n_ok[None, :] & r_ok[:, None], other=0.0,
        )
        acc = mma(h, bt, acc, DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _rank_grad_kernel(
    dy_ptr, b_ptr, p_in_ptr, g_out_ptr, db_ptr, dscale_ptr, scale_ptr,
    M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scale_val,
    ACT: tl.constexpr, NEED_DB: tl.constexpr, DB_PARTIAL: tl.constexpr, NEED_DSCALE: tl.constexpr,
    G_ATOMIC: tl.constexpr, SCALE_IS_PTR: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # program (row block, BR-wide rank slice, N split). G_ATOMIC: the N splits add their partial
    # dY·B into a zeroed G (identity activation, no ds: the launcher splits N only then).
    # DB_PARTIAL: each row block stores its own (N, R) slice of dB (deterministic, summed by the
    # caller) instead of fp32 atomics into one (N, R) buffer
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    rn0 = tl.arange(0, BN)
    n_start = tl.program_id(2) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    m_ok = rm < M
    r_ok = rr < R
    valid = m_ok[:, None] & r_ok[None, :]
    s = load_scale(scale_ptr, scale_val, SCALE_IS_PTR)
    pt = tl.load(p_in_ptr + rm[:, None] * R + rr[None, :], mask=valid, other=0.0)
    h_s = tl.where(valid, apply_act(pt, ACT) * s, 0.0).to(dy_ptr.dtype.element_ty)
    dh = tl.zeros((BM, BR), dtype=tl.float32)
    for n0 in range(n_start, n_end, BN):
        rn = n0 + rn0
        n_ok = rn < n_end
        dy = tl.load(
            dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
            mask=m_ok[:, None] & n_ok[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
            mask=n_ok[:, None] & r_ok[None, :], other=0.0,
        )
        dh = mma(dy, b, dh, DOT_PREC)
        if NEED_DB:
            part = mma(tl.trans(dy), h_s, None, DOT_PREC)
            db_ptrs = db_ptr + rn[:, None] * R + rr[None, :]
            if DB_PARTIAL:  # int64: blocks x N x R passes 2**31 long before any one tensor does
                tl.store(db_ptrs + pid.to(tl.int64) * N * R, part, mask=n_ok[:, None] & r_ok[None, :])
            else:
                tl.atomic_add(db_ptrs, part, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
    if ACT != 0 or NEED_DSCALE:  # P reloaded (an L2 hit), not held in registers over the loop
        pt = tl.load(p_in_ptr + rm[:, None] * R + rr[None, :], mask=valid, other=0.0)
    if NEED_DSCALE:  # one partial per (row block, rank slice), summed by the launcher
        h = tl.where(valid, apply_act(pt, ACT), 0.0)
        tl.store(dscale_ptr + pid * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(dh * h, axis=1), axis=0))
    if ACT != 0:
        dh = dh * apply_act_grad(pt, ACT)
    if G_ATOMIC:
        tl.atomic_add(g_out_ptr + rm[:, None] * R + rr[None, :], dh, mask=valid, sem="relaxed")
    else:
        tl.store(g_out_ptr + rm[:, None] * R + rr[None, :], dh, mask=valid)


@triton.jit(do_not_specialize=["seed"])  # one compile for every seed
def _input_grad_kernel(
    dy_ptr, w_ptr, res_ptr, g_in_ptr, a_ptr, dx_ptr, scale_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_resm, stride_resk,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    seed, p, inv_keep, scale_val,
    HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SCALE_IS_PTR: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(K, BK), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    m_ok = rm < M
    k_ok = rk < K
    # one (BM, BK) accumulator: the adapter term first, in BR-wide rank slices (BR <= 64), masked,
    # then the dY·W GEMM on top of it (a second accumulator for the term spilled at BM = BK = 128)
    s = load_scale(scale_ptr, scale_val, SCALE_IS_PTR)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rs = r0 + rr
        r_ok = rs < R
        g = tl.load(g_in_ptr + rm[:, None] * R + rs[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        g = (g * s).to(dx_ptr.dtype.element_ty)
        a = tl.load(
            a_ptr + rs[:, None] * stride_ar + rk[None, :] * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :], other=0.0,
        )
        acc = mma(g, a, acc, DOT_PREC)
    if HAS_DROPOUT:
        acc = tl.where(dropout_keep(seed, rm, rk, K, p), acc * inv_keep, 0.0)
    if HAS_W:
        rn0 = tl.arange(0, BN)
        for n0 in range(0, N, BN):
            rn = n0 + rn0
            n_ok = rn < N
            dy = tl.load(
                dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                mask=m_ok[:, None] & n_ok[None, :], other=0.0,
            )
            w = tl.load(
                w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                mask=n_ok[:, None] & k_ok[None, :], other=0.0,
            )
            acc = mma(dy, w, acc, DOT_PREC)
    if HAS_RES:
        res = tl.load(
            res_ptr + rm[:, None] * stride_resm + rk[None, :] * stride_resk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )
        acc = acc + res.to(tl.float32)
    tl.store(
        dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=m_ok[:, None] & k_ok[None, :],
    )


@triton.jit(do_not_specialize=["seed"])  # one compile for every seed
def _down_weight_grad_kernel(
    x_ptr, g_in_ptr, da_ptr, scale_ptr,
    M, K, R, rows_per_split,
    stride_xm, stride_xk,
    seed, p, inv_keep, scale_val,
    HAS_DROPOUT: tl.constexpr, SCALE_IS_PTR: tl.constexpr, USE_ATOMIC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # dAᵀ tile (BK, BR) = dropout(X)ᵀ[BK, rows] · (s·G)[rows, BR], rows of this split only
    # program (K block, M split, BR-wide rank slice)
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.program_id(2) * BR + tl.arange(0, BR)
    rm0 = tl.arange(0, BM)
    k_ok = rk < K
    r_ok = rr < R
    s = load_scale(scale_ptr, scale_val, SCALE_IS_PTR)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BK, BR), dtype=tl.float32)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + rm0
        m_ok = rm < m_end
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, rk, K, p), x, 0.0).to(x.dtype)
        g = tl.load(g_in_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        g = (g * s).to(x_ptr.dtype.element_ty)
        acc = mma(tl.trans(x), g, acc, DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    ptrs = da_ptr + rr[None, :] * K + rk[:, None]
    out_mask = k_ok[:, None] & r_ok[None, :]
    if USE_ATOMIC:
        tl.atomic_add(ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=out_mask)


# ----------------------------------------------------------------------------------------------
# launch configurations (the offline compile test walks `shipped_kernel_specs`)
# ----------------------------------------------------------------------------------------------

# GEMM kernels (_fused_up_kernel, _input_grad_kernel): (BM, BN, BK) tiles per element size.
# fp32 (IEEE unless TF32 is allowed) takes 64 x 64 tiles with 8 warps at every M: its FMA-unit
# dot holds operand tiles in registers, and the 128 x 128 tile spilled 3-47 KB per thread (offline
# ptxas -v; tests/kernels/test_triton_compile.py checks spills and shared memory of every config).
_GEMM_LARGE = {2: BlockConfig(128, 128, 64, 8, 3), 4: BlockConfig(64, 64, 32, 8, 3)}
_GEMM_SMALL = {2: BlockConfig(64, 64, 64, 4, 3), 4: BlockConfig(64, 64, 32, 8, 3)}
# row-block kernels (_down_proj, _rank_grad, _down_weight_grad): BM rows, BK/BN streamed columns,
# one program per BR-wide rank slice (BR <= 64); fp32 with 8 warps for the same reason
_ROWBLOCK = {2: BlockConfig(64, 64, 64, 4, 3), 4: BlockConfig(64, 32, 32, 8, 3)}
GROUP_M = 8
#: widest rank slice a row-block program holds
RANK_SLICE = 64
#: rank slice of the GEMM kernels' loop over the rank per element size: fp32 (an FMA-unit dot
#: unless TF32 is on) spilled with 64-wide slices of both operands in registers
_GEMM_RANK_SLICE = {2: 64, 4: 16}


def gemm_rank_slice(dtype: torch.dtype) -> int:
    """Width of the rank slices the GEMM kernels loop over (every rank from 1 to MAX_RANK)."""
    return _GEMM_RANK_SLICE[torch.finfo(dtype).bits // 8]


def gemm_config(M: int, dtype: torch.dtype) -> BlockConfig:
    """Tile config of the two GEMM kernels: smaller tiles when M is small (decode, tiny batches)."""
    size = torch.finfo(dtype).bits // 8
    return (_GEMM_SMALL if M <= 64 else _GEMM_LARGE)[size]


def rowblock_config(BR: int, dtype: torch.dtype) -> BlockConfig:
    """Config of the kernels that keep a (BM, BR) rank tile (BR <= RANK_SLICE)."""
    size = torch.finfo(dtype).bits // 8
    return _ROWBLOCK[size]


def rank_slice(r: int) -> int:
    """Width of the rank slice a program holds: the padded rank, at most RANK_SLICE."""
    return min(RANK_SLICE, rank_block(r))


def _split(total_blocks: int, programs: int, device) -> int:
    """Splits of a reduction of `total_blocks` blocks so that `programs` x splits fills the GPU
    (about two programs per SM); 1 on the CPU and under torch.use_deterministic_algorithms."""
    if device.type != "cuda" or deterministic():
        return 1
    want = -(-2 * num_sms(device) // max(1, programs))
    return max(1, min(total_blocks, want))


def _split_range(total: int, block: int, splits: int):
    """(elements per split, splits) of a reduction over `total` elements in `block`-wide blocks
    asked to run in `splits` ranges: whole blocks per split, and only the splits that get any."""
    per_split = max(1, triton.cdiv(triton.cdiv(total, block), splits)) * block
    return per_split, max(1, triton.cdiv(total, per_split))


# ----------------------------------------------------------------------------------------------
# launchers shared with bottleneck.py (no checks: callers validate)
# ----------------------------------------------------------------------------------------------


def _dropout_args(dropout_p):
    p = float(dropout_p)
    return p, (1.0 / (1.0 - p) if p > 0 else 1.0), p > 0


def launch_down_proj(x, a, dropout_p, seed, k_splits=None):
    """P = dropout(x) · aᵀ: x (M, K), a (r, K) -> P (M, r) fp32.

    One program per (row block, rank slice); when those are too few for the GPU (M = 2048 is 32
    row blocks) K is split too and the splits add into P with relaxed fp32 atomics. ``k_splits``
    overrides the choice (tests)."""
    M, K = x.shape
    R = a.shape[0]
    BR = rank_slice(R)
    cfg = rowblock_config(BR, x.dtype)
    p, inv_keep, has_do = _dropout_args(dropout_p)
    m_blocks, r_slices = triton.cdiv(M, cfg.BM), triton.cdiv(R, BR)
    k_blocks = triton.cdiv(K, cfg.BK)
    splits = k_splits if k_splits is not None else _split(k_blocks, m_blocks * r_slices, x.device)
    k_per_split, splits = _split_range(K, cfg.BK, splits)
    out = (torch.zeros if splits > 1 else torch.empty)((M, R), device=x.device, dtype=torch.float32)
    with device_guard(x):
        _down_proj_kernel[(m_blocks, r_slices, splits)](
            x, a, out, M, K, R, k_per_split,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1),
            int(seed), p, inv_keep,
            HAS_DROPOUT=has_do, USE_ATOMIC=splits > 1, DOT_PREC=dot_precision(x.dtype),
            BM=cfg.BM, BK=cfg.BK, BR=BR, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def launch_fused_up(x, weight, bias, p_in, b, scaling, activation):
    """y = x · weightᵀ + bias + (s · act(p_in)) · bᵀ: x (M, K), weight (N, K), p_in (M, r), b (N, r)."""
    M, K = x.shape
    N = weight.shape[0]
    R = p_in.shape[1]
    cfg = gemm_config(M, x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    scale_ptr, scale_val, scale_is_ptr = scale_args(scaling, x)
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    with device_guard(x):
        _fused_up_kernel[grid](
            x, weight, bias if bias is not None else x, p_in, b, y, scale_ptr,
            M, N, K, R,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), b.stride(0), b.stride(1),
            y.stride(0), y.stride(1),
            scale_val,
            ACT=activation, HAS_BIAS=bias is not None, SCALE_IS_PTR=scale_is_ptr,
            DOT_PREC=dot_precision(x.dtype),
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=gemm_rank_slice(x.dtype), GROUP_M=GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y


def deterministic() -> bool:
    """torch.use_deterministic_algorithms(True): reductions over M without fp32 atomics."""
    return torch.are_deterministic_algorithms_enabled()


def launch_rank_grad(grad_y, b, p_in, scaling, activation, need_db, need_dscale, n_splits=None):
    """G = (dy·b) ⊙ act'(P) (M, r) fp32; dB = s·dyᵀ·act(P) (N, r) fp32; ds = Σ (dy·b) ⊙ act(P).

    One program per (row block, rank slice); for LoRA (identity activation, no ds) N is split too
    when those are too few for the GPU, the splits adding into G with relaxed fp32 atomics.
    ``n_splits`` overrides the choice (tests)."""
    M, N = grad_y.shape
    R = p_in.shape[1]
    BR = rank_slice(R)
    cfg = rowblock_config(BR, grad_y.dtype)
    m_blocks, r_slices = triton.cdiv(M, cfg.BM), triton.cdiv(R, BR)
    partial = need_db and deterministic() and m_blocks > 1
    splittable = activation == ACT_IDENTITY and not need_dscale and not partial
    n_blocks = triton.cdiv(N, cfg.BN)
    if not splittable:
        splits = 1
    elif n_splits is not None:
        splits = n_splits
    else:
        splits = _split(n_blocks, m_blocks * r_slices, grad_y.device)
    n_per_split, splits = _split_range(N, cfg.BN, splits)
    g = (torch.zeros if splits > 1 else torch.empty)((M, R), device=grad_y.device, dtype=torch.float32)
    if partial:
        db = torch.empty((m_blocks, N, R), device=grad_y.device, dtype=torch.float32)
    elif need_db:
        db = torch.zeros((N, R), device=grad_y.device, dtype=torch.float32)
    else:
        db = g
    ds_part = (torch.empty((m_blocks * r_slices,), device=grad_y.device, dtype=torch.float32)
               if need_dscale else g)
    scale_ptr, scale_val, scale_is_ptr = scale_args(scaling, grad_y)
    with device_guard(grad_y):
        _rank_grad_kernel[(m_blocks, r_slices, splits)](
            grad_y, b, p_in, g, db, ds_part, scale_ptr,
            M, N, R, n_per_split,
            grad_y.stride(0), grad_y.stride(1), b.stride(0), b.stride(1),
            scale_val,
            ACT=activation, NEED_DB=need_db, DB_PARTIAL=partial, NEED_DSCALE=need_dscale,
            G_ATOMIC=splits > 1, SCALE_IS_PTR=scale_is_ptr, DOT_PREC=dot_precision(grad_y.dtype),
            BM=cfg.BM, BN=cfg.BN, BR=BR, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if partial:
        db = db.sum(0)
    return g, (db if need_db else None), (ds_part.sum() if need_dscale else None)


def launch_input_grad(grad_y, weight, residual, g, a, scaling, dropout_p, seed, out_dtype, out=None):
    """dx = [grad_y · weight] + [residual] + s · (g · a) ⊙ mask / (1 - p): (M, K) in out_dtype.

    ``out``: write dx there (may be ``residual`` itself: each tile is read before it is written by
    the same program, so a chain of members accumulates in place)."""
    M = g.shape[0]
    R, K = a.shape
    N = weight.shape[0] if weight is not None else 0
    # without the dY·W GEMM (series adapters) the kernel is memory-bound: the small tiles (the
    # large ones spilled 168 B on sm_90 for the masked term next to the residual tile)
    cfg = gemm_config(M if weight is not None else 1, out_dtype)
    p, inv_keep, has_do = _dropout_args(dropout_p)
    dx = torch.empty((M, K), device=g.device, dtype=out_dtype) if out is None else out
    scale_ptr, scale_val, scale_is_ptr = scale_args(scaling, g)
    w = weight if weight is not None else a
    res = residual if residual is not None else dx
    # output tile is (BM, BN) over (M, K); the reduction over N streams BK-wide slices
    bk_out, bn_red = cfg.BN, cfg.BK
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(K, bk_out),)
    with device_guard(g):
        _input_grad_kernel[grid](
            grad_y if grad_y is not None else dx, w, res, g, a, dx, scale_ptr,
            M, N, K, R,
            grad_y.stride(0) if grad_y is not None else 0, grad_y.stride(1) if grad_y is not None else 0,
            w.stride(0), w.stride(1), res.stride(0), res.stride(1),
            a.stride(0), a.stride(1), dx.stride(0), dx.stride(1),
            int(seed), p, inv_keep, scale_val,
            HAS_W=weight is not None, HAS_RES=residual is not None, HAS_DROPOUT=has_do,
            SCALE_IS_PTR=scale_is_ptr, DOT_PREC=dot_precision(out_dtype),
            BM=cfg.BM, BN=bn_red, BK=bk_out, BR=gemm_rank_slice(out_dtype), GROUP_M=GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dx


def row_splits(M, K, R, cfg, device, programs_per_split=None):
    """(k_blocks, splits, rows_per_split, da) of a reduction over M into an (R, K) fp32 dA: enough
    programs to fill the machine, the M range split and combined with fp32 atomics (da zeroed),
    one split under torch.use_deterministic_algorithms. ``programs_per_split``: programs of one
    split (default: the K blocks)."""
    k_blocks = triton.cdiv(K, cfg.BK)
    m_blocks = triton.cdiv(M, cfg.BM)
    per = programs_per_split or k_blocks
    splits = 1 if deterministic() else max(1, min(m_blocks, (2 * num_sms(device)) // per))
    rows_per_split = triton.cdiv(m_blocks, splits) * cfg.BM
    splits = triton.cdiv(M, rows_per_split)
    da = (torch.zeros if splits > 1 else torch.empty)((R, K), device=device, dtype=torch.float32)
    return k_blocks, splits, rows_per_split, da


def launch_down_weight_grad(x, g, scaling, dropout_p, seed):
    """dA = s · gᵀ · dropout(x): x (M, K), g (M, r) fp32 -> (r, K) fp32."""
    M, K = x.shape
    R = g.shape[1]
    BR = rank_slice(R)
    cfg = rowblock_config(BR, x.dtype)
    r_slices = triton.cdiv(R, BR)
    p, inv_keep, has_do = _dropout_args(dropout_p)
    k_blocks, splits, rows_per_split, da = row_splits(M, K, R, cfg, x.device,
                                                      triton.cdiv(K, cfg.BK) * r_slices)
    scale_ptr, scale_val, scale_is_ptr = scale_args(scaling, x)
    with device_guard(x):
        _down_weight_grad_kernel[(k_blocks, splits, r_slices)](
            x, g, da, scale_ptr,
            M, K, R, rows_per_split,
            x.stride(0), x.stride(1),
            int(seed), p, inv_keep, scale_val,
            HAS_DROPOUT=has_do, SCALE_IS_PTR=scale_is_ptr, USE_ATOMIC=splits > 1,
            DOT_PREC=dot_precision(x.dtype),
            BM=cfg.BM, BK=cfg.BK, BR=BR, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return da


# ----------------------------------------------------------------------------------------------
# public launch functions
# ----------------------------------------------------------------------------------------------


def _check_lora_args(x, weight, bias, lora_A, lora_B):
    check_tensor("x", x, (None, None))
    check_dtype("x", x)
    M, K = x.shape
    check_tensor("weight", weight, (None, K), dtype=x.dtype, device=x.device)
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N,), dtype=x.dtype, device=x.device)
    check_tensor("lora_A", lora_A, (None, K), device=x.device)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"expected lora_A of shape (r, {K}) with r >= 1, got {tuple(lora_A.shape)}")
    check_rank("rank r (lora_A.shape[0])", r)
    check_tensor("lora_B", lora_B, (N, r), device=x.device)
    check_dtype("lora_A", lora_A)
    check_dtype("lora_B", lora_B)
    check_index_range("x", x)
    check_index_range("weight", weight)
    if M * N >= 2**31:
        raise ValueError(f"y would have {M} x {N} = {M * N} elements; the kernels support fewer than 2**31")
    return M, K, N, r


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0):
    """Fused LoRA linear forward.

        keep[m, k] = philox(seed, m*K + k) >= p             (no mask stored; all-true when p = 0)
        S = (x ⊙ keep / (1 - p)) · lora_Aᵀ                 (M, r) fp32
        y = x · weightᵀ + bias + (scaling · S) · lora_Bᵀ    (M, N), one GEMM accumulator

    x (M, K) fp16/bf16/fp32; weight (N, K) in x's dtype, any strides (a transposed view such as
    gpt2's Conv1D weight.t() is read in place); bias (N,) or None; lora_A (r, K); lora_B (N, r)
    (cast to x's dtype for the tensor-core dots); scaling float or 1-element tensor; dropout_p in
    [0, 1); seed in [0, 2**31). Returns (y (M, N) in x's dtype, S (M, r) fp32): keep S for backward.
    """
    M, K, N, r = _check_lora_args(x, weight, bias, lora_A, lora_B)
    check_dropout(dropout_p, seed)
    if dropout_p > 0:
        check_philox_range("x", M, K)
    a = lora_A.to(x.dtype)
    b = lora_B.to(x.dtype)
    if M == 0:
        return x.new_empty((0, N)), torch.empty((0, r), device=x.device, dtype=torch.float32)
    s = launch_down_proj(x, a, dropout_p, seed)
    y = launch_fused_up(x, weight, bias, s, b, scaling, ACT_IDENTITY)
    return y, s


def lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0,
                    need_grad_x=True):
    """Fused LoRA linear backward; the dropout mask is regenerated from (seed, dropout_p).

        dS      = grad_y · lora_B                                  (M, r) fp32
        grad_B  = scaling · grad_yᵀ · S                            (N, r)   from the same read of grad_y
        grad_x  = grad_y · weight + scaling · (dS · lora_A) ⊙ keep / (1 - p)   (M, K), one GEMM
        grad_A  = scaling · dSᵀ · (x ⊙ keep / (1 - p))             (r, K)

    grad_y (M, N) in x's dtype; x, weight, lora_A, lora_B, scaling, dropout_p, seed as given to
    `lora_linear_fwd`; s the (M, r) fp32 S it returned. The frozen weight and bias get no
    gradient. Returns (grad_x or None if not need_grad_x, grad_A in lora_A's dtype,
    grad_B in lora_B's dtype).
    """
    M, K, N, r = _check_lora_args(x, weight, None, lora_A, lora_B)
    check_tensor("grad_y", grad_y, (M, N), dtype=x.dtype, device=x.device)
    check_tensor("s", s, (M, r), dtype=torch.float32, device=x.device)
    check_dropout(dropout_p, seed)
    if M == 0:
        return (torch.zeros_like(x) if need_grad_x else None,
                torch.zeros_like(lora_A), torch.zeros_like(lora_B))
    a = lora_A.to(x.dtype)
    b = lora_B.to(x.dtype)
    s = s.contiguous()
    ds, db, _ = launch_rank_grad(grad_y, b, s, scaling, ACT_IDENTITY, need_db=True, need_dscale=False)
    grad_x = None
    if need_grad_x:
        grad_x = launch_input_grad(grad_y, weight, None, ds, a, scaling, dropout_p, seed, x.dtype)
    da = launch_down_weight_grad(x, ds, scaling, dropout_p, seed)
    return grad_x, da.to(lora_A.dtype), db.to(lora_B.dtype)


# ----------------------------------------------------------------------------------------------
# offline-compile description of every shipped configuration
# ----------------------------------------------------------------------------------------------


def _spec(name, fn, dtype, constexprs, cfg, fp32_ptrs=(), unit_strides=(), **extra):
    sig, consts, attrs = make_signature(
        fn, {k: "fp32" for k in fp32_ptrs}, constexprs, TRITON_DTYPE_NAMES[dtype], unit_strides
    )
    return dict(name=name, fn=fn, dtype=dtype, signature=sig, constexprs=consts, attrs=attrs,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)


#: rank slices a row-block program can hold: rank_slice(r) for r = 1..MAX_RANK
RANK_SLICES = (16, 32, 64)


def shipped_kernel_specs(dtype=torch.bfloat16):
    """One entry per tile configuration the LoRA launchers can pick, for offline compilation.

    GEMM kernels: the large and the small-M config (the rank term is looped in RANK_SLICE-wide
    slices whatever the rank, so one compile covers ranks 1 to 256). Row-block kernels: each rank
    slice (16, 32, 64: ranks 1-16, 17-32, 33-256), with the constexpr variants the launchers use
    (K / N splits with atomics, the activation with a learned scaling).
    """
    size = torch.finfo(dtype).bits // 8
    prec = dot_precision(dtype)
    specs = []
    for tag, cfg in (("large", _GEMM_LARGE[size]), ("small", _GEMM_SMALL[size])):
        specs += gemm_specs(tag, cfg, dtype, prec)
    if dtype == torch.float32:  # with torch.backends.cuda.matmul.allow_tf32 the dots run on tensor cores
        specs += gemm_specs("large/tf32", _GEMM_LARGE[size], dtype, "tf32")
    cfg = _ROWBLOCK[size]
    for BR in RANK_SLICES:
        specs.append(_spec(
            f"down_proj/r{BR}", _down_proj_kernel, dtype,
            dict(HAS_DROPOUT=True, USE_ATOMIC=BR != 64, DOT_PREC=prec, BM=cfg.BM, BK=cfg.BK, BR=BR),
            cfg, fp32_ptrs=("p_out_ptr",), unit_strides=("stride_xk", "stride_ak"), gemm=True,
        ))
        wide = BR == 64  # the bottleneck's variant: activation, learned scaling, no N split
        specs.append(_spec(
            f"rank_grad/r{BR}", _rank_grad_kernel, dtype,
            dict(ACT=ACT_GELU if wide else ACT_IDENTITY, NEED_DB=True, DB_PARTIAL=False, NEED_DSCALE=wide,
                 G_ATOMIC=not wide, SCALE_IS_PTR=wide, DOT_PREC=prec, BM=cfg.BM, BN=cfg.BN, BR=BR),
            cfg, fp32_ptrs=("p_in_ptr", "g_out_ptr", "db_ptr", "dscale_ptr", "scale_ptr"),
            unit_strides=("stride_dyn", "stride_br"),
        ))
        specs.append(_spec(
            f"down_weight_grad/r{BR}", _down_weight_grad_kernel, dtype,
            dict(HAS_DROPOUT=True, SCALE_IS_PTR=False, USE_ATOMIC=True, DOT_PREC=prec,
                 BM=cfg.BM, BK=cfg.BK, BR=BR),
            cfg, fp32_ptrs=("g_in_ptr", "da_ptr", "scale_ptr"), unit_strides=("stride_xk",),
        ))
    return specs


def gemm_specs(tag, cfg, dtype, prec, act=ACT_IDENTITY):
    """Compile specs of the two GEMM kernels (forward and input-grad) for one tile config."""
    return [
        _spec(
            f"fused_up/{tag}", _fused_up_kernel, dtype,
            dict(ACT=act, HAS_BIAS=True, SCALE_IS_PTR=False, DOT_PREC=prec,
                 BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=gemm_rank_slice(dtype), GROUP_M=GROUP_M),
            cfg, fp32_ptrs=("p_in_ptr", "scale_ptr"),
            unit_strides=("stride_xk", "stride_wk", "stride_br", "stride_yn"),
        ),
        _spec(
            f"input_grad/{tag}", _input_grad_kernel, dtype,
            dict(HAS_W=True, HAS_RES=False, HAS_DROPOUT=True, SCALE_IS_PTR=False,
                 DOT_PREC=prec, BM=cfg.BM, BN=cfg.BK, BK=cfg.BN, BR=gemm_rank_slice(dtype), GROUP_M=GROUP_M),
            cfg, fp32_ptrs=("g_in_ptr", "scale_ptr"),
            unit_strides=("stride_dyn", "stride_wk", "stride_resk", "stride_ak", "stride_dxk"),
        ),
        _spec(  # the grouped q/k/v backward chains the members' dX in place: W and a residual
            f"input_grad/{tag}/res", _input_grad_kernel, dtype,
            dict(HAS_W=True, HAS_RES=True, HAS_DROPOUT=True, SCALE_IS_PTR=True,
                 DOT_PREC=prec, BM=cfg.BM, BN=cfg.BK, BK=cfg.BN, BR=gemm_rank_slice(dtype), GROUP_M=GROUP_M),
            cfg, fp32_ptrs=("g_in_ptr", "scale_ptr"),
            unit_strides=("stride_dyn", "stride_wk", "stride_resk", "stride_ak", "stride_dxk"),
        ),
    ]
