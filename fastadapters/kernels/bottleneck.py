"""Bottleneck (series / parallel) adapters in Triton, forward and backward.

    f(z) = act(dropout(z)·Dᵀ)·Uᵀ       D = adapter_down (b, d_in), U = adapter_up (d_out, b)

Placements (LLM-Adapters semantics):
  output   h = base(x);  y = h + s·f(h)           `bottleneck_residual_fwd/bwd` on h
  mh       x' = x + s·f(x);  y = base(x')          `bottleneck_residual_fwd/bwd` on x; the caller
                                                  runs the base linear
  parallel y = x·Wᵀ + bias + s·f(x)               `bottleneck_parallel_fwd/bwd`: the LoRA kernels
                                                  of `lora.py` with the activation switched on

The residual forward is one kernel per row block (`_residual_fwd_kernel`): it streams z once to
build the (BM, b) pre-activation tile P, keeps act(P) on chip and streams the output columns
y = z + s·act(P)·Uᵀ (split in up to four column ranges, each rebuilding P, when the row blocks
are too few for the GPU). Only z and P (M, b) fp32 are needed by the backward:
  G  = (dy·U) ⊙ act'(P),  dU = s·dyᵀ·act(P),  ds = Σ (dy·U) ⊙ act(P)   one read of dy
  dz = dy + s·(G·D) ⊙ mask/(1-p)                                       one pass
  dD = s·Gᵀ·dropout(z)
The scaling s is a float or a learned 1-element tensor (read on device, gradient returned).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    ACT_GELU,
    ACT_TANH,
    BlockConfig,
    activation_id,
    apply_act,
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
    rank_block,
    scale_args,
)
from . import lora as _lora_kernels
from .lora import (
    GROUP_M,
    gemm_rank_slice,
    _input_grad_kernel,
    _split_range,
    _spec,
    gemm_config,
    launch_down_proj,
    launch_down_weight_grad,
    launch_fused_up,
    launch_input_grad,
    launch_rank_grad,
    gemm_specs,
)


@triton.jit(do_not_specialize=["seed"])  # one compile for every seed
def _residual_fwd_kernel(
    z_ptr, d_ptr, u_ptr, y_ptr, p_out_ptr, scale_ptr,
    M, D, R, n_per_split,
    stride_zm, stride_zk, stride_dr, stride_dk, stride_un, stride_ur, stride_ym, stride_yn,
    seed, p, inv_keep, scale_val,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SCALE_IS_PTR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    # program (row block, output-column split): each split recomputes the (BM, BR) P from its
    # rows (an L2 re-read of z) so that few row blocks still fill the GPU; split 0 stores P
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    rk0 = tl.arange(0, BK)
    m_ok = rm < M
    r_ok = rr < R
    # P = dropout(z) · Dᵀ, (BM, BR) fp32, kept on chip
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + rk0
        z = tl.load(
            z_ptr + rm[:, None] * stride_zm + kk[None, :] * stride_zk,
            mask=m_ok[:, None] & (kk[None, :] < D), other=0.0,
        )
        if HAS_DROPOUT:
            z = tl.where(dropout_keep(seed, rm, kk, D, p), z, 0.0).to(z.dtype)
        dw = tl.load(
            d_ptr + rr[None, :] * stride_dr + kk[:, None] * stride_dk,
            mask=r_ok[None, :] & (kk[:, None] < D), other=0.0,
        )
        acc = mma(z, dw, acc, DOT_PREC)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    if tl.program_id(1) == 0:
        tl.store(p_out_ptr + rm[:, None] * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])
    s = load_scale(scale_ptr, scale_val, SCALE_IS_PTR)
    h = tl.where(r_ok[None, :], apply_act(acc, ACT) * s, 0.0).to(y_ptr.dtype.element_ty)
    # y = z + (s·act(P)) · Uᵀ, streamed over this split's output columns
    rn0 = tl.arange(0, BN)
    n_start = tl.program_id(1) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, D)
    for n0 in range(n_start, n_end, BN):
        rn = n0 + rn0
        n_ok = rn < n_end
        ut = tl.load(
            u_ptr + rn[None, :] * stride_un + rr[:, None] * stride_ur,
            mask=n_ok[None, :] & r_ok[:, None], other=0.0,
        )
        out = mma(h, ut, None, DOT_PREC)
        res = tl.load(
            z_ptr + rm[:, None] * stride_zm + rn[None, :] * stride_zk,
            mask=m_ok[:, None] & n_ok[None, :], other=0.0,
        )
        out = out + res.to(tl.float32)
        tl.store(
            y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
            out.to(y_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )


# (BM, BN, BK) of the residual kernel per element size; more warps for wide hidden tiles
_RESIDUAL = {2: BlockConfig(64, 64, 64, 4, 3), 4: BlockConfig(64, 32, 32, 4, 3)}
_RESIDUAL_WIDE = {2: BlockConfig(64, 64, 64, 8, 2), 4: BlockConfig(64, 32, 32, 8, 2)}


MAX_COLUMN_SPLITS = 4


def residual_config(BR: int, dtype: torch.dtype) -> BlockConfig:
    size = torch.finfo(dtype).bits // 8
    return (_RESIDUAL_WIDE if BR >= 128 else _RESIDUAL)[size]


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def _check_adapter(z, down, up, d_out):
    M, d_in = z.shape
    check_tensor("adapter_down", down, (None, d_in), device=z.device)
    b = down.shape[0]
    if b < 1:
        raise ValueError(f"expected adapter_down of shape (b, {d_in}) with b >= 1, got {tuple(down.shape)}")
    check_rank("bottleneck size b (adapter_down.shape[0])", b)
    check_tensor("adapter_up", up, (d_out, b), device=z.device)
    check_dtype("adapter_down", down)
    check_dtype("adapter_up", up)
    check_index_range("input", z)
    if z.shape[0] * d_out >= 2**31:
        raise ValueError(f"the output would have {z.shape[0]} x {d_out} elements; the kernels support fewer than 2**31")
    return b


def _scaling_grad_wanted(scaling):
    return isinstance(scaling, torch.Tensor)


# ----------------------------------------------------------------------------------------------
# residual placements (output, mh)
# ----------------------------------------------------------------------------------------------


def bottleneck_residual_fwd(z, adapter_down, adapter_up, scaling, activation="relu",
                            dropout_p=0.0, seed=0):
    """Series adapter with its residual, one kernel per row block.

        keep[m, k] = philox(seed, m*d + k) >= p
        P = (z ⊙ keep / (1 - p)) · adapter_downᵀ        (M, b) fp32, the pre-activation
        y = z + (scaling · act(P)) · adapter_upᵀ        (M, d)

    z (M, d) fp16/bf16/fp32 (h for the output placement, x for mh); adapter_down (b, d);
    adapter_up (d, b) (cast to z's dtype); scaling float or 1-element tensor; activation a name of
    `_common.ACTIVATIONS` or its id. Returns (y (M, d) in z's dtype, P (M, b) fp32): keep z and P
    for the backward.
    """
    check_tensor("z", z, (None, None))
    check_dtype("z", z)
    M, d = z.shape
    b = _check_adapter(z, adapter_down, adapter_up, d)
    act = activation_id(activation)
    check_dropout(dropout_p, seed)
    if dropout_p > 0:
        check_philox_range("z", M, d)
    if M == 0:
        return z.new_empty((0, d)), torch.empty((0, b), device=z.device, dtype=torch.float32)
    dw = adapter_down.to(z.dtype)
    uw = adapter_up.to(z.dtype)
    BR = rank_block(b)
    cfg = residual_config(BR, z.dtype)
    p = float(dropout_p)
    y = torch.empty((M, d), device=z.device, dtype=z.dtype)
    pre = torch.empty((M, b), device=z.device, dtype=torch.float32)
    scale_ptr, scale_val, scale_is_ptr = scale_args(scaling, z)
    m_blocks, n_blocks = triton.cdiv(M, cfg.BM), triton.cdiv(d, cfg.BN)
    # few row blocks (M = 2048 is 32): split the output columns too, at most 4 ways (each split
    # re-reads its rows of z to rebuild P)
    splits = min(MAX_COLUMN_SPLITS, _lora_kernels._split(n_blocks, m_blocks, z.device))
    n_per_split, splits = _split_range(d, cfg.BN, splits)
    with device_guard(z):
        _residual_fwd_kernel[(m_blocks, splits)](
            z, dw, uw, y, pre, scale_ptr,
            M, d, b, n_per_split,
            z.stride(0), z.stride(1), dw.stride(0), dw.stride(1), uw.stride(0), uw.stride(1),
            y.stride(0), y.stride(1),
            int(seed), p, 1.0 / (1.0 - p), scale_val,
            ACT=act, HAS_DROPOUT=p > 0, SCALE_IS_PTR=scale_is_ptr, DOT_PREC=dot_precision(z.dtype),
            BM=cfg.BM, BK=cfg.BK, BN=cfg.BN, BR=BR, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y, pre


def _adapter_bwd(grad_y, z, weight, pre, adapter_down, adapter_up, scaling, act, dropout_p, seed,
                 need_grad_z):
    dw = adapter_down.to(z.dtype)
    uw = adapter_up.to(z.dtype)
    pre = pre.contiguous()
    want_ds = _scaling_grad_wanted(scaling)
    g, du, ds = launch_rank_grad(grad_y, uw, pre, scaling, act, need_db=True, need_dscale=want_ds)
    grad_z = None
    if need_grad_z:
        residual = grad_y if weight is None else None
        grad_z = launch_input_grad(grad_y, weight, residual, g, dw, scaling, dropout_p, seed, z.dtype)
    dd = launch_down_weight_grad(z, g, scaling, dropout_p, seed)
    if want_ds:
        ds = ds.reshape(scaling.shape).to(scaling.dtype)
    return grad_z, dd.to(adapter_down.dtype), du.to(adapter_up.dtype), ds


def bottleneck_residual_bwd(grad_y, z, pre, adapter_down, adapter_up, scaling, activation="relu",
                            dropout_p=0.0, seed=0, need_grad_z=True):
    """Backward of `bottleneck_residual_fwd` from z and the pre-activation P only.

        Hd        = grad_y · adapter_up                              (M, b) fp32
        G         = Hd ⊙ act'(P)
        grad_up   = scaling · grad_yᵀ · act(P)                       (d, b)   same read of grad_y
        grad_s    = Σ Hd ⊙ act(P)                                    scalar (tensor scaling only)
        grad_z    = grad_y + scaling · (G · adapter_down) ⊙ keep / (1 - p)       (M, d)
        grad_down = scaling · Gᵀ · (z ⊙ keep / (1 - p))               (b, d)

    Arguments as given to / returned by the forward; grad_y (M, d) in z's dtype. Returns
    (grad_z or None, grad_down, grad_up, grad_scaling: a tensor shaped like scaling when scaling
    is a tensor, else None).
    """
    check_tensor("z", z, (None, None))
    check_dtype("z", z)
    M, d = z.shape
    b = _check_adapter(z, adapter_down, adapter_up, d)
    check_tensor("grad_y", grad_y, (M, d), dtype=z.dtype, device=z.device)
    check_tensor("pre", pre, (M, b), dtype=torch.float32, device=z.device)
    check_dropout(dropout_p, seed)
    act = activation_id(activation)
    if M == 0:
        ds = torch.zeros_like(scaling) if _scaling_grad_wanted(scaling) else None
        return (grad_y.clone() if need_grad_z else None, torch.zeros_like(adapter_down),
                torch.zeros_like(adapter_up), ds)
    return _adapter_bwd(grad_y, z, None, pre, adapter_down, adapter_up, scaling, act, dropout_p,
                        seed, need_grad_z)


# ----------------------------------------------------------------------------------------------
# parallel placement
# ----------------------------------------------------------------------------------------------


def _check_parallel(x, weight, bias):
    check_tensor("x", x, (None, None))
    check_dtype("x", x)
    M, K = x.shape
    check_tensor("weight", weight, (None, K), dtype=x.dtype, device=x.device)
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, (N,), dtype=x.dtype, device=x.device)
    check_index_range("weight", weight)
    return M, K, N


def bottleneck_parallel_fwd(x, weight, bias, adapter_down, adapter_up, scaling, activation="relu",
                            dropout_p=0.0, seed=0):
    """Parallel adapter fused into the frozen base GEMM.

        P = (x ⊙ keep / (1 - p)) · adapter_downᵀ                         (M, b) fp32
        y = x · weightᵀ + bias + (scaling · act(P)) · adapter_upᵀ        (M, N), one accumulator

    x (M, K); weight (N, K) in x's dtype, any strides; bias (N,) or None; adapter_down (b, K);
    adapter_up (N, b). Returns (y (M, N), P (M, b) fp32).
    """
    M, K, N = _check_parallel(x, weight, bias)
    b = _check_adapter(x, adapter_down, adapter_up, N)
    act = activation_id(activation)
    check_dropout(dropout_p, seed)
    if dropout_p > 0:
        check_philox_range("x", M, K)
    if M == 0:
        return x.new_empty((0, N)), torch.empty((0, b), device=x.device, dtype=torch.float32)
    pre = launch_down_proj(x, adapter_down.to(x.dtype), dropout_p, seed)
    y = launch_fused_up(x, weight, bias, pre, adapter_up.to(x.dtype), scaling, act)
    return y, pre


def bottleneck_parallel_bwd(grad_y, x, weight, pre, adapter_down, adapter_up, scaling,
                            activation="relu", dropout_p=0.0, seed=0, need_grad_x=True):
    """Backward of `bottleneck_parallel_fwd` (frozen weight and bias get no gradient).

        Hd        = grad_y · adapter_up;  G = Hd ⊙ act'(P)               (M, b) fp32
        grad_up   = scaling · grad_yᵀ · act(P)                           (N, b)
        grad_s    = Σ Hd ⊙ act(P)                                        (tensor scaling only)
        grad_x    = grad_y · weight + scaling · (G · adapter_down) ⊙ keep / (1 - p)   one GEMM
        grad_down = scaling · Gᵀ · (x ⊙ keep / (1 - p))                   (b, K)

    Returns (grad_x or None, grad_down, grad_up, grad_scaling or None).
    """
    M, K, N = _check_parallel(x, weight, None)
    b = _check_adapter(x, adapter_down, adapter_up, N)
    check_tensor("grad_y", grad_y, (M, N), dtype=x.dtype, device=x.device)
    check_tensor("pre", pre, (M, b), dtype=torch.float32, device=x.device)
    check_dropout(dropout_p, seed)
    act = activation_id(activation)
    if M == 0:
        ds = torch.zeros_like(scaling) if _scaling_grad_wanted(scaling) else None
        return (torch.zeros_like(x) if need_grad_x else None, torch.zeros_like(adapter_down),
                torch.zeros_like(adapter_up), ds)
    return _adapter_bwd(grad_y, x, weight, pre, adapter_down, adapter_up, scaling, act, dropout_p,
                        seed, need_grad_x)


# ----------------------------------------------------------------------------------------------
# offline-compile description
# ----------------------------------------------------------------------------------------------


def shipped_kernel_specs(dtype=torch.bfloat16):
    """Bottleneck-only kernel configurations, for offline compilation.

    The residual forward keeps the whole (BM, b) pre-activation on chip: it is compiled at b padded
    to 64 (the narrow config; 16 and 32 use it with smaller tiles) and at 128 and 256 (the wide
    one). The residual backward's input-grad kernel without the weight GEMM (HAS_W=False; small
    tiles at every M), and the parallel placement's GEMMs (the LoRA kernels) with a gelu
    branch; their rank loop covers every b. The row-block backward kernels are the LoRA ones.
    """
    prec = dot_precision(dtype)
    specs = []
    for BR in (64, 128, 256):
        cfg = residual_config(BR, dtype)
        specs.append(_spec(
            f"residual_fwd/b{BR}", _residual_fwd_kernel, dtype,
            dict(ACT=ACT_TANH, HAS_DROPOUT=True, SCALE_IS_PTR=True, DOT_PREC=prec,
                 BM=cfg.BM, BK=cfg.BK, BN=cfg.BN, BR=BR),
            cfg, fp32_ptrs=("p_out_ptr", "scale_ptr"),
            unit_strides=("stride_zk", "stride_dk", "stride_ur", "stride_yn"),
        ))
    for tag, M in (("small", 64),):  # the launcher takes the small tiles at every M without W
        gcfg = gemm_config(M, dtype)
        specs.append(_spec(
            f"residual_input_grad/{tag}", _input_grad_kernel, dtype,
            dict(HAS_W=False, HAS_RES=True, HAS_DROPOUT=True, SCALE_IS_PTR=True, DOT_PREC=prec,
                 BM=gcfg.BM, BN=gcfg.BK, BK=gcfg.BN, BR=gemm_rank_slice(dtype), GROUP_M=GROUP_M),
            gcfg, fp32_ptrs=("g_in_ptr", "scale_ptr"),
            unit_strides=("stride_dyn", "stride_wk", "stride_resk", "stride_ak", "stride_dxk"),
        ))
    # the parallel placement's forward GEMM with an activation (its input-grad GEMM is lora's)
    specs += [dict(sp, name="parallel_" + sp["name"])
              for sp in gemm_specs("large", gemm_config(4096, dtype), dtype, prec, act=ACT_GELU)[:1]]
    return specs
