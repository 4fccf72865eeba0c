"""LoRA linear op: the frozen base matmul plus the low-rank branch, one call.

Semantics (shapes: x (..., K), W (N, K), b (N,), A (r, K), B (N, r), s = alpha/r or alpha/sqrt(r))::

    xd = dropout(x, p)                      # only when training and p > 0
    y  = x @ W.T + b + s * (xd @ A.T) @ B.T  # (..., N)

W may be a transposed view (gpt2's Conv1D stores (K, N)); the adapter weights may be fp32 while x
is fp16/bf16 (the branch then runs in the adapter dtype and is cast back, as PEFT does).

``lora_linear_ref`` states the semantics in plain torch; ``lora_linear`` is the entry point the
layers call: it checks the shapes and dispatches to a backend (``torch`` here; kernels register
theirs). The torch path is what CPU users run, so it is lean: the base GEMM is one ``addmm``, the
low-rank product is folded into its output with an in-place ``addmm_`` (no (M, N) temporary), and
dropout is applied only when it does something.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


@dispatch.register(OP, "torch")
def lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    xd = F.dropout(x2, dropout_p, True) if (training and dropout_p > 0) else x2
    if xd.dtype != lora_A.dtype:
        xd = xd.to(lora_A.dtype)
    s = xd @ lora_A.t()  # (M, r)
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    B = lora_B
    if s.dtype != out.dtype:
        s, B = s.to(out.dtype), B.to(out.dtype)
    out.addmm_(s, B.t(), alpha=scaling)
    return out.view(*x.shape[:-1], n)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                training: bool = False, backend: str | None = None):
    """y = x W^T + b + s·B·A·dropout(x). ``backend`` None: FASTADAPTERS_BACKEND or "auto"."""
    check_lora_args(x, weight, bias, lora_A, lora_B)
    return dispatch.call(OP, backend, x.device, x, weight, bias, lora_A, lora_B, float(scaling),
                         float(dropout_p), bool(training))
