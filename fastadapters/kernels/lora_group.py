"""LoRA (and parallel adapters) on sibling projections that share one input (q/k/v, gate/up): X
read once for all of them.

For G = 2 or 3 members with the same input X, dropout p and their own seeds::

    Y_g = X·W_gᵀ + b_g + s_g · (dropout_g(X)·A_gᵀ)·B_gᵀ           g = 0 .. G-1

the ungrouped op reads X three times per member beyond its base GEMM (the down projection in the
forward, dA in the backward) and autograd then adds the members' dX. Grouped:

  _down_proj_group_kernel         S = [dropout_g(X)·A_gᵀ]_g            one pass over X for all members
  (per member) _fused_up_kernel   Y_g = X·W_gᵀ + b_g + s_g·S_g·B_gᵀ     as the single op
  (per member) _rank_grad_kernel  G_g = dY_g·B_g, dB_g                  as the single op
  (per member) _input_grad_kernel dX += dY_g·W_g + s_g·(G_g·A_g)⊙keep_g  chained in place: dX is
                                                                       written once per member,
                                                                       no separate sums
  _down_weight_grad_group_kernel  dA = [s_g·G_gᵀ·dropout_g(X)]_g        one pass over X

The members' ranks sit in one padded layout: member g owns columns [g·BRG, g·BRG + r_g) of S and
rows of A_pad / dA_pad, with BRG = the widest member's padded rank (<= 256). Each member keeps its
own (BM, BRG) accumulator, so the X tile loaded once feeds G dots with no work on the others'
columns; wide members (G·BRG > 256) take short row blocks to keep the accumulators in registers.
Each member's Philox stream is its
own seed with offsets m·K + k, exactly the single op's, so grouped and ungrouped runs draw the same
masks from the same seeds. With an activation the members are parallel bottleneck adapters
(Y_g = X·W_gᵀ + b_g + s_g·act(dropout_g(X)·D_gᵀ)·U_gᵀ, the LoRA kernels with the activation on, as
``bottleneck.bottleneck_parallel_*``), learned scalings included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ACT_IDENTITY,
    MAX_RANK,
    BlockConfig,
    check_dropout,
    check_philox_range,
    device_guard,
    dot_precision,
    dropout_keep,
    mma,
    rank_block,
)
from . import lora as _lora_kernels
from .lora import (
    _check_lora_args,
    _dropout_args,
    _split_range,
    launch_fused_up,
    launch_input_grad,
    launch_rank_grad,
    row_splits,
)

MAX_GROUP = 3


@triton.jit
def _member_down(x, a_ptr, g: tl.constexpr, rm, kk, K, stride_ar, stride_ak, seed, p, acc,
                 HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BRG: tl.constexpr):
    """acc + dropout_g(x tile) · (member g's rows of A_pad)ᵀ: (BM, BRG)."""
    rr = g * BRG + tl.arange(0, BRG)
    a = tl.load(a_ptr + rr[None, :] * stride_ar + kk[:, None] * stride_ak, mask=kk[:, None] < K, other=0.0)
    if HAS_DROPOUT:
        x = tl.where(dropout_keep(seed, rm, kk, K, p), x, 0.0).to(a.dtype)
    return mma(x, a, acc, DOT_PREC)


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def _down_proj_group_kernel(
    x_ptr, a_ptr, p_out_ptr,
    M, K, RT, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak,
    seed0, seed1, seed2, p, inv_keep,
    HAS_DROPOUT: tl.constexpr, G: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BRG: tl.constexpr,
):
    # one accumulator per member: the X tile is loaded once and feeds G dots of (BM, BK)·(BK, BRG);
    # program (row block, K split): K splits add into a zeroed S_pad with relaxed atomics
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc0 = tl.zeros((BM, BRG), dtype=tl.float32)
    acc1 = tl.zeros((BM, BRG), dtype=tl.float32)
    acc2 = tl.zeros((BM, BRG), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (kk[None, :] < k_end), other=0.0,
        )
        acc0 = _member_down(x, a_ptr, 0, rm, kk, K, stride_ar, stride_ak, seed0, p, acc0, HAS_DROPOUT, DOT_PREC, BRG)
        if G > 1:
            acc1 = _member_down(x, a_ptr, 1, rm, kk, K, stride_ar, stride_ak, seed1, p, acc1, HAS_DROPOUT, DOT_PREC,
                                BRG)
        if G > 2:
            acc2 = _member_down(x, a_ptr, 2, rm, kk, K, stride_ar, stride_ak, seed2, p, acc2, HAS_DROPOUT, DOT_PREC,
                                BRG)
    _store_member_p(p_out_ptr, acc0 * inv_keep, 0, rm, M, RT, USE_ATOMIC, BRG)
    if G > 1:
        _store_member_p(p_out_ptr, acc1 * inv_keep, 1, rm, M, RT, USE_ATOMIC, BRG)
    if G > 2:
        _store_member_p(p_out_ptr, acc2 * inv_keep, 2, rm, M, RT, USE_ATOMIC, BRG)


@triton.jit
def _store_member_p(p_out_ptr, acc, g: tl.constexpr, rm, M, RT, USE_ATOMIC: tl.constexpr, BRG: tl.constexpr):
    rr = g * BRG + tl.arange(0, BRG)
    ptrs = p_out_ptr + rm[:, None] * RT + rr[None, :]
    if USE_ATOMIC:
        tl.atomic_add(ptrs, acc, mask=rm[:, None] < M, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=rm[:, None] < M)


@triton.jit
def _member_down_grad(x, g_in_ptr, g: tl.constexpr, rm, m_ok, rk, K, RT, seed, p, acc,
                      HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, BRG: tl.constexpr):
    """acc + dropout_g(x tile)ᵀ · (member g's columns of Gs): (BK, BRG)."""
    rr = g * BRG + tl.arange(0, BRG)
    gs = tl.load(g_in_ptr + rm[:, None] * RT + rr[None, :], mask=m_ok[:, None], other=0.0).to(x.dtype)
    if HAS_DROPOUT:
        x = tl.where(dropout_keep(seed, rm, rk, K, p), x, 0.0).to(gs.dtype)
    return mma(tl.trans(x), gs, acc, DOT_PREC)


@triton.jit
def _store_member_grad(da_ptr, acc, g: tl.constexpr, rk, k_ok, K, USE_ATOMIC: tl.constexpr, BRG: tl.constexpr):
    rr = g * BRG + tl.arange(0, BRG)
    ptrs = da_ptr + rr[None, :] * K + rk[:, None]
    if USE_ATOMIC:
        tl.atomic_add(ptrs, acc, mask=k_ok[:, None], sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=k_ok[:, None])


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def _down_weight_grad_group_kernel(
    x_ptr, g_in_ptr, da_ptr,
    M, K, RT, rows_per_split,
    stride_xm, stride_xk,
    seed0, seed1, seed2, p, inv_keep,
    HAS_DROPOUT: tl.constexpr, G: tl.constexpr, USE_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BRG: tl.constexpr,
):
    # per member, dA_gᵀ tile (BK, BRG) = dropout_g(X)ᵀ[BK, rows] · Gs[rows, member g's columns]
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    rm0 = tl.arange(0, BM)
    k_ok = rk < K
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc0 = tl.zeros((BK, BRG), dtype=tl.float32)
    acc1 = tl.zeros((BK, BRG), dtype=tl.float32)
    acc2 = tl.zeros((BK, BRG), dtype=tl.float32)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + rm0
        m_ok = rm < m_end
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        )
        acc0 = _member_down_grad(x, g_in_ptr, 0, rm, m_ok, rk, K, RT, seed0, p, acc0, HAS_DROPOUT, DOT_PREC, BRG)
        if G > 1:
            acc1 = _member_down_grad(x, g_in_ptr, 1, rm, m_ok, rk, K, RT, seed1, p, acc1, HAS_DROPOUT, DOT_PREC,
                                     BRG)
        if G > 2:
            acc2 = _member_down_grad(x, g_in_ptr, 2, rm, m_ok, rk, K, RT, seed2, p, acc2, HAS_DROPOUT, DOT_PREC,
                                     BRG)
    _store_member_grad(da_ptr, acc0 * inv_keep, 0, rk, k_ok, K, USE_ATOMIC, BRG)
    if G > 1:
        _store_member_grad(da_ptr, acc1 * inv_keep, 1, rk, k_ok, K, USE_ATOMIC, BRG)
    if G > 2:
        _store_member_grad(da_ptr, acc2 * inv_keep, 2, rk, k_ok, K, USE_ATOMIC, BRG)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def group_layout(ranks) -> int:
    """BRG: each member's padded block in the layout (the widest member's padded rank)."""
    return max(rank_block(r) for r in ranks)


# (BM, BN, BK) of the group kernels per element size: G·BRG <= 64, <= 256, wider
_GROUP_NARROW = {2: BlockConfig(64, 32, 32, 4, 3), 4: BlockConfig(64, 32, 32, 4, 3)}
_GROUP_MID = {2: BlockConfig(64, 64, 64, 8, 2), 4: BlockConfig(64, 32, 32, 8, 2)}
_GROUP_WIDE = {2: BlockConfig(16, 32, 32, 8, 2), 4: BlockConfig(16, 32, 16, 8, 2)}


def group_config(G: int, brg: int, dtype: torch.dtype) -> BlockConfig:
    """Tiles of the two group kernels: the G (BM, BRG) accumulators (forward; (BK, BRG) in the dA
    kernel) and G Philox masks of the X tile stay in registers, so narrow members stream 32-wide
    K slices and wide members take short row / column blocks."""
    size = torch.finfo(dtype).bits // 8
    if G * brg > 256:
        return _GROUP_WIDE[size]
    return (_GROUP_NARROW if G * brg <= 64 else _GROUP_MID)[size]


def group_unsupported(ranks) -> str | None:
    """Why these members cannot run grouped (None if they can)."""
    if not 2 <= len(ranks) <= MAX_GROUP:
        return f"groups of 2 to {MAX_GROUP} projections, got {len(ranks)}"
    if max(ranks) > MAX_RANK:
        return f"ranks up to {MAX_RANK}, got {list(ranks)}"
    return None


def _seeds3(seeds):
    s = [int(v) for v in seeds] + [0] * (MAX_GROUP - len(seeds))
    return s[0], s[1], s[2]


def launch_down_proj_group(x, a_pad, brg, G, dropout_p, seeds, k_splits=None):
    """S_pad (M, G·brg) fp32 = [dropout_g(x)·A_gᵀ]_g from the padded (G·brg, K) a_pad, one pass over x
    (K split, the splits adding with relaxed atomics, when the row blocks are too few for the GPU;
    ``k_splits`` overrides the choice)."""
    M, K = x.shape
    RT = a_pad.shape[0]
    cfg = group_config(G, brg, x.dtype)
    p, inv_keep, has_do = _dropout_args(dropout_p)
    m_blocks, k_blocks = triton.cdiv(M, cfg.BM), triton.cdiv(K, cfg.BK)
    splits = k_splits if k_splits is not None else _lora_kernels._split(k_blocks, m_blocks, x.device)
    k_per_split, splits = _split_range(K, cfg.BK, splits)
    out = (torch.zeros if splits > 1 else torch.empty)((M, RT), device=x.device, dtype=torch.float32)
    with device_guard(x):
        _down_proj_group_kernel[(m_blocks, splits)](
            x, a_pad, out, M, K, RT, k_per_split,
            x.stride(0), x.stride(1), a_pad.stride(0), a_pad.stride(1),
            *_seeds3(seeds), p, inv_keep,
            HAS_DROPOUT=has_do, G=G, USE_ATOMIC=splits > 1, DOT_PREC=dot_precision(x.dtype),
            BM=cfg.BM, BK=cfg.BK, BRG=brg, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def launch_down_weight_grad_group(x, g_pad, brg, G, dropout_p, seeds):
    """dA_pad (RT, K) fp32 = [G_gᵀ·dropout_g(x)]_g for the scaled padded (M, RT) g_pad, one pass over x."""
    M, K = x.shape
    RT = g_pad.shape[1]
    cfg = group_config(G, brg, x.dtype)
    p, inv_keep, has_do = _dropout_args(dropout_p)
    k_blocks, splits, rows_per_split, da = row_splits(M, K, RT, cfg, x.device)
    with device_guard(x):
        _down_weight_grad_group_kernel[(k_blocks, splits)](
            x, g_pad, da, M, K, RT, rows_per_split,
            x.stride(0), x.stride(1),
            *_seeds3(seeds), p, inv_keep,
            HAS_DROPOUT=has_do, G=G, USE_ATOMIC=splits > 1, DOT_PREC=dot_precision(x.dtype),
            BM=cfg.BM, BK=cfg.BK, BRG=brg, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return da


def _check_group(x, weights, biases, As, Bs, scalings, dropout_p, seeds):
    G = len(weights)
    if not (len(biases) == len(As) == len(Bs) == len(scalings) == len(seeds) == G):
        raise ValueError(f"expected one bias, lora_A, lora_B, scaling and seed per member ({G} weights), got "
                         f"{len(biases)}, {len(As)}, {len(Bs)}, {len(scalings)}, {len(seeds)}")
    why = group_unsupported([a.shape[0] for a in As])
    if why is not None:
        raise ValueError(f"lora group: {why}")
    for g in range(G):
        _check_lora_args(x, weights[g], biases[g], As[g], Bs[g])
        check_dropout(dropout_p, seeds[g])
    if dropout_p > 0:
        check_philox_range("x", *x.shape)


def _pad_rows(tensors, brg, width, dtype):
    """Stack (r_g, K) tensors into one zero-padded (width, K) tensor, member g at row g·brg."""
    out = torch.zeros((width, tensors[0].shape[1]), device=tensors[0].device, dtype=dtype)
    for g, t in enumerate(tensors):
        out[g * brg: g * brg + t.shape[0]] = t
    return out


def lora_group_fwd(x, weights, biases, As, Bs, scalings, dropout_p=0.0, seeds=None, activation=ACT_IDENTITY):
    """Forward of G LoRA linears on one input. Returns ([Y_g], S_pad (M, G·BRG) fp32).

    Arguments per member as `lora.lora_linear_fwd` takes them (lists); seeds one per member.
    ``activation`` (an ``_common`` activation id) makes the members parallel bottleneck adapters,
    Y_g = X·W_gᵀ + b_g + s_g·act(S_g)·B_gᵀ, as ``bottleneck.bottleneck_parallel_fwd``; a scaling
    may be a 1-element tensor (learned)."""
    seeds = list(seeds) if seeds is not None else [0] * len(weights)
    _check_group(x, weights, biases, As, Bs, scalings, dropout_p, seeds)
    G = len(weights)
    ranks = [a.shape[0] for a in As]
    brg = group_layout(ranks)
    M = x.shape[0]
    a_pad = _pad_rows([a.to(x.dtype) for a in As], brg, G * brg, x.dtype)
    if M == 0:
        s_pad = torch.empty((0, G * brg), device=x.device, dtype=torch.float32)
    else:
        s_pad = launch_down_proj_group(x, a_pad, brg, G, dropout_p, seeds)
    ys = []
    for g in range(G):
        if M == 0:
            ys.append(x.new_empty((0, weights[g].shape[0])))
            continue
        s_g = s_pad[:, g * brg: g * brg + ranks[g]].contiguous()
        ys.append(launch_fused_up(x, weights[g], biases[g], s_g, Bs[g].to(x.dtype), scalings[g], activation))
    return ys, s_pad


def lora_group_bwd(grad_ys, x, weights, As, Bs, s_pad, scalings, dropout_p=0.0, seeds=None, need_grad_x=True,
                   activation=ACT_IDENTITY):
    """Backward of `lora_group_fwd`. ``grad_ys[g]`` may be None (that member's output got no
    gradient). Returns (grad_x or None, [grad_A_g], [grad_B_g], [grad_scaling_g]) in the adapters'
    dtypes; grad_scaling_g is None for a float scaling."""
    seeds = list(seeds) if seeds is not None else [0] * len(weights)
    _check_group(x, weights, [None] * len(weights), As, Bs, scalings, dropout_p, seeds)
    G = len(weights)
    ranks = [a.shape[0] for a in As]
    brg = group_layout(ranks)
    M, K = x.shape
    dBs = [torch.zeros_like(b) for b in Bs]
    learned = [isinstance(sc, torch.Tensor) for sc in scalings]
    dscales = [torch.zeros_like(sc) if ln else None for sc, ln in zip(scalings, learned)]
    g_pad = torch.zeros((M, G * brg), device=x.device, dtype=torch.float32)
    dx = None
    for g in range(G):
        dy = grad_ys[g]
        if dy is None or M == 0:
            continue
        dy = dy.contiguous()
        s_g = s_pad[:, g * brg: g * brg + ranks[g]].contiguous()
        b = Bs[g].to(x.dtype)
        ds, db, dsc = launch_rank_grad(dy, b, s_g, scalings[g], activation, need_db=True, need_dscale=learned[g])
        dBs[g] = db.to(Bs[g].dtype)
        if learned[g]:
            dscales[g] = dsc.reshape(scalings[g].shape).to(scalings[g].dtype)
            g_pad[:, g * brg: g * brg + ranks[g]] = ds * scalings[g].detach().reshape(()).float()
        else:
            g_pad[:, g * brg: g * brg + ranks[g]] = ds * float(scalings[g])
        if need_grad_x:  # chained in place: each member adds its dY_g·W_g and masked LoRA term
            dx = launch_input_grad(dy, weights[g], dx, ds, As[g].to(x.dtype), scalings[g], dropout_p, seeds[g],
                                   x.dtype, out=dx)
    if need_grad_x and dx is None:
        dx = torch.zeros_like(x)
    if M == 0:
        return dx, [torch.zeros_like(a) for a in As], dBs, dscales
    da_pad = launch_down_weight_grad_group(x, g_pad, brg, G, dropout_p, seeds)
    dAs = [da_pad[g * brg: g * brg + ranks[g]].to(As[g].dtype) for g in range(G)]
    return dx, dAs, dBs, dscales


# ----------------------------------------------------------------------------------------------
# offline-compile description of the shipped configurations
# ----------------------------------------------------------------------------------------------


def shipped_kernel_specs(dtype=torch.bfloat16):
    """The two group kernels with dropout, three members, at q/k/v rank 16 (BRG = 16), at 64 and at
    the widest members (BRG = 256, the paper's parallel bottleneck), for the offline compile test
    (two members use the same configs with less work; the chained dX is `lora`'s
    ``input_grad/large/res``)."""
    from ._common import TRITON_DTYPE_NAMES, make_signature

    prec = dot_precision(dtype)
    specs = []
    for brg in (16, 64, 256):
        for name, fn, consts, fp32_ptrs, unit, cfg in (
            ("down_proj_group", _down_proj_group_kernel, dict(HAS_DROPOUT=True, G=3, USE_ATOMIC=True),
             ("p_out_ptr",), ("stride_xk", "stride_ak"), group_config(3, brg, dtype)),
            ("down_weight_grad_group", _down_weight_grad_group_kernel, dict(HAS_DROPOUT=True, G=3, USE_ATOMIC=True),
             ("g_in_ptr", "da_ptr"), ("stride_xk",), group_config(3, brg, dtype)),
        ):
            sig, cx, attrs = make_signature(fn, {k: "fp32" for k in fp32_ptrs},
                                            dict(consts, DOT_PREC=prec, BM=cfg.BM, BK=cfg.BK, BRG=brg),
                                            TRITON_DTYPE_NAMES[dtype], unit)
            # tiles below wgmma's 64 rows (the wide config's 16-row blocks; the dA kernel's (BK, BRG)
            # accumulators with 32-wide K blocks, which at BK = 64 spilled 36 B): mma.sync on sm_90 too
            rows = cfg.BM if fn is _down_proj_group_kernel else cfg.BK
            specs.append(dict(name=f"{name}/g3/r{brg}", fn=fn, dtype=dtype, signature=sig, constexprs=cx,
                              attrs=attrs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              mma_sync_ok=rows < 64))
    return specs
