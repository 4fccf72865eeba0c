"""LoRA linear op: the frozen base matmul plus the low-rank branch, one call.

Semantics (shapes: x (..., K), W (N, K), b (N,), A (r, K), B (N, r), s = alpha/r or alpha/sqrt(r))::

    xd = dropout(x, p)                      # only when training and p > 0
    y  = x @ W.T + b + s * (xd @ A.T) @ B.T  # (..., N)

W may be a transposed view (gpt2's Conv1D stores (K, N)); the adapter weights may be fp32 while x
is fp16/bf16 (the branch then runs in the adapter dtype and is cast back, as PEFT does).

``lora_linear_ref`` states the semantics in plain torch; ``lora_linear`` is the entry point the
layers call: it checks the shapes and dispatches to a backend (``torch`` here; kernels register
theirs). The torch path is what CPU users run, so it is lean: the base GEMM is one ``addmm``, the
low-rank product is folded into its output with an in-place ``addmm_`` (no (M, N) temporary),
dropout is applied only when it does something, and the backward is written by hand (see
``_LoRALinearTorch``).
"""
from __future__ import annotations

import torch

from . import dispatch

OP = "lora_linear"


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask=None, dropout_p: float = 0.0):
    """Plain-torch statement of the op. ``dropout_mask`` (bool, x's shape) selects kept inputs, scaled by 1/(1-p)."""
    xd = x if dropout_mask is None else x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scaling * ((xd.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()).to(y.dtype)


def check_lora_args(x, weight, bias, lora_A, lora_B) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected weight of shape (N, K), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"expected x of shape (*, {k}), got {tuple(x.shape)}")
    if bias is not None:
        dispatch.check_shape("bias", bias, (n,))
    dispatch.check_shape("lora_A", lora_A, (None, k))
    dispatch.check_shape("lora_B", lora_B, (n, lora_A.shape[0]))


class _LoRALinearTorch(torch.autograd.Function):
    """The CPU path with a hand-written backward.

    Saves x (usually alive anyway: the previous op's output, shared by q/k/v), the bool dropout
    mask and S = xd·Aᵀ (M, r) — not PEFT's per-target dropped copy of x. Backward takes dX in one
    ``addmm`` on top of the masked low-rank term, so no (M, K) partial sums are added separately.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
        mask = None
        if training and dropout_p > 0:
            xd, mask = torch.native_dropout(x2, dropout_p, True)
        else:
            xd = x2
        xa = xd if xd.dtype == lora_A.dtype else xd.to(lora_A.dtype)
        s = xa @ lora_A.t()  # (M, r)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if s.dtype != out.dtype:
            out.addmm_(s.to(out.dtype), lora_B.t().to(out.dtype), alpha=scaling)
        else:
            out.addmm_(s, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, s, mask)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, s, mask = ctx.saved_tensors
        scaling, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dyf = dy if dy.dtype == lora_B.dtype else dy.to(lora_B.dtype)
        g = (dyf @ lora_B).mul_(scaling)  # dS: (M, r)
        dx = dw = db = da = dbb = None
        if need_bb:
            dbb = (dyf.t() @ s).mul_(scaling)
        if need_a:
            xd = x2 if mask is None else x2 * mask * (1.0 / (1.0 - p))
            da = g.t() @ (xd if xd.dtype == g.dtype else xd.to(g.dtype))
        if need_x:
            low = g.to(dy.dtype) @ lora_A.to(dy.dtype)  # (M, K)
            if mask is not None:
                low.mul_(mask).mul_(1.0 / (1.0 - p))
            dx = low.addmm_(dy, weight)
        if need_w:
            dw = dy.t() @ x2
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dw, db, da, dbb, None, None, None


@dispatch.register(OP, "torch")
def lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
    k, n = x.shape[-1], weight.shape[0]
    out = _LoRALinearTorch.apply(x.reshape(-1, k), weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return out.view(*x.shape[:-1], n)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                training: bool = False, backend: str | None = None):
    """y = x W^T + b + s·B·A·dropout(x). ``backend`` None: FASTADAPTERS_BACKEND or "auto"."""
    check_lora_args(x, weight, bias, lora_A, lora_B)
    return dispatch.call(OP, backend, x.device, x, weight, bias, lora_A, lora_B, float(scaling),
                         float(dropout_p), bool(training))
