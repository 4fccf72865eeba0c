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
``_LoRALinearTorch``). When no input needs a gradient (decoding under no_grad / inference_mode) the
same forward arithmetic runs without the ``autograd.Function``, whose ``apply`` costs more than the
GEMMs at a few rows.
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


def _lora_forward_torch(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
    """The torch path's forward arithmetic, shared by the autograd path and the no-grad path so both
    give the same bits: (out (M, N), S = xd·Aᵀ (M, r), the bool dropout mask or None).

    Three GEMM calls: ``linear`` for the base (an ``addmm`` with the bias), ``linear`` for S, and an
    in-place ``addmm_`` that adds s·S·Bᵀ into the base output (the scale folded into the GEMM's
    alpha, no (M, N) temporary)."""
    mask = None
    if training and dropout_p > 0:
        xd, mask = torch.native_dropout(x2, dropout_p, True)
    else:
        xd = x2
    s = F.linear(xd if xd.dtype == lora_A.dtype else xd.to(lora_A.dtype), lora_A)  # (M, r)
    out = F.linear(x2, weight, bias)  # 2-D: addmm(bias, x2, Wᵀ), or mm without a bias
    if s.dtype != out.dtype:
        out.addmm_(s.to(out.dtype), lora_B.t().to(out.dtype), alpha=scaling)
    else:
        out.addmm_(s, lora_B.t(), alpha=scaling)
    return out, s, mask


class _LoRALinearTorch(torch.autograd.Function):
    """The CPU path with a hand-written backward.

    Saves x (usually alive anyway: the previous op's output, shared by q/k/v), the bool dropout
    mask and S = xd·Aᵀ (M, r) — not PEFT's per-target dropped copy of x. Backward takes dX in one
    ``addmm`` on top of the masked low-rank term, so no (M, K) partial sums are added separately.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
        out, s, mask = _lora_forward_torch(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, s, mask)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, s, mask = ctx.saved_tensors
        scaling, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dyf = dy if dy.dtype == lora_B.dtype else dy.to(lora_B.dtype)
        # dS = s·dY·B, with the dropout scale 1/(1-p) folded into this (M, r) factor, not an (M, K) one
        g = (dyf @ lora_B).mul_(scaling if mask is None else scaling / (1.0 - p))
        dx = dw = db = da = dbb = None
        if need_bb:
            dbb = (dyf.t() @ s).mul_(scaling)
        if need_a:
            xd = x2 if mask is None else x2 * mask
            da = g.t() @ (xd if xd.dtype == g.dtype else xd.to(g.dtype))
        if need_x:
            low = g.to(dy.dtype) @ lora_A.to(dy.dtype)  # (M, K)
            if mask is not None:
                low.mul_(mask)
            dx = low.addmm_(dy, weight)
        if need_w:
            dw = dy.t() @ x2
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dw, db, da, dbb, None, None, None


@dispatch.register(OP, "torch")
def lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    dev = x.device.type
    # autocast would cast each matmul separately and mismatch the in-place fold: do its job once
    x2, weight, bias, autocast_on = dispatch.autocast_inputs(dev, x2, weight, bias)
    # no input needs a gradient (decoding under no_grad / inference_mode, or everything frozen):
    # the same arithmetic without the autograd.Function, whose apply costs more than the three
    # GEMMs when M is a few rows
    grad = _needs_grad(x2, weight, bias, lora_A, lora_B)
    if autocast_on:
        with torch.autocast(dev, enabled=False):
            out = _lora_torch_2d(grad, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    else:
        out = _lora_torch_2d(grad, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return out.view(*x.shape[:-1], n)


def _lora_torch_2d(grad: bool, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
    if grad:
        return _LoRALinearTorch.apply(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    return _lora_forward_torch(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training)[0]


def _needs_grad(x2, weight, bias, lora_A, lora_B) -> bool:
    """Whether autograd would record the op (grad mode on and an input requires grad)."""
    return torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad or lora_A.requires_grad
                                        or lora_B.requires_grad or (bias is not None and bias.requires_grad))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0,
                training: bool = False, backend: str | None = None):
    """y = x W^T + b + s·B·A·dropout(x). ``backend`` None: FASTADAPTERS_BACKEND or "auto"."""
    check_lora_args(x, weight, bias, lora_A, lora_B)
    return dispatch.call(OP, backend, x.device, x, weight, bias, lora_A, lora_B, float(scaling),
                         float(dropout_p), bool(training))


# ---------------------------------------------------------------------------------------------
# triton path: fastadapters.kernels.lora behind torch.library custom ops
# ---------------------------------------------------------------------------------------------
#
# Two opaque ops (forward returns (y, S); backward returns (dx, dA, dB)) with fakes, and
# register_autograd tying them together, so torch.compile(fullgraph=True) traces through without
# a graph break. The dropout seed is a 1-element int64 CPU tensor drawn from torch's default
# generator outside the op (reproducible under torch.manual_seed, traceable); the kernels
# regenerate the Philox mask from it, so no mask is saved. The branch runs in x's dtype on the
# tensor cores (fp32 adapter weights are rounded to x's dtype for the dots; accumulation is fp32,
# S and the gradients of A and B are fp32-accumulated and returned in the adapters' dtype).


def _draw_seed() -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


@torch.library.custom_op("fastadapters::lora_linear_triton_fwd", mutates_args=())
def _lora_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, scaling: float, dropout_p: float,
                     seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastadapters.kernels.lora import lora_linear_fwd

    return lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed.item()))


@_lora_triton_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastadapters::lora_linear_triton_bwd", mutates_args=())
def _lora_triton_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                     need_grad_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastadapters.kernels.lora import lora_linear_bwd

    dx, da, db = lora_linear_bwd(grad_y.contiguous(), x, weight, lora_A, lora_B, s, scaling, dropout_p,
                                 int(seed.item()), need_grad_x=need_grad_x)
    return (dx if dx is not None else x.new_empty((0,))), da, db


@_lora_triton_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_grad_x):
    dx = torch.empty_like(x) if need_grad_x else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _lora_triton_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.mark_non_differentiable(output[1])


def _lora_triton_backward(ctx, grad_y, grad_s):
    x, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    dx = dw = db = da = dbb = None
    if need_x or need_a or need_bb:
        dx, da, dbb = _lora_triton_bwd(grad_y, x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p,
                                       seed, bool(need_x))
        dx = dx if need_x else None
        da = da if need_a else None
        dbb = dbb if need_bb else None
    if need_w:  # an unfrozen base weight: plain GEMM, the kernels assume it frozen
        dw = (grad_y.t() @ x).to(weight.dtype)
    if need_b and ctx.has_bias:
        db = grad_y.sum(0)
    return dx, dw, db, da, dbb, None, None, None


_lora_triton_fwd.register_autograd(_lora_triton_backward, setup_context=_lora_triton_setup)


_FALLBACK_WARNED: set = set()


def triton_unsupported(dtype, width: int, what: str, elements: int = 0) -> str | None:
    """Why the Triton kernels cannot take this call (None if they can). ``elements``: the largest
    tensor (input, weight or output) the kernels would index, in elements."""
    from fastadapters.kernels._common import MAX_RANK, SUPPORTED_DTYPES

    if dtype not in SUPPORTED_DTYPES:
        return f"the kernels take float16, bfloat16 or float32 inputs, got {dtype}"
    if width > MAX_RANK:
        return f"the kernels take {what} <= {MAX_RANK}, got {width}"
    if elements >= 2**31:  # e.g. a LoRA on a 128k-vocabulary lm_head over a long batch
        return f"the kernels index with int32 and take tensors of fewer than 2**31 elements, got {elements}"
    return None


def triton_fallback_warning(op: str, why: str) -> None:
    """One warning per (op, reason) when the triton backend hands a call to the torch path."""
    if (op, why) not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add((op, why))
        import warnings

        warnings.warn(f"fastadapters: {op} runs the plain torch path (slower): {why}", RuntimeWarning, stacklevel=3)


def lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, training: bool):
    """The triton backend of ``lora_linear`` (same arguments as the torch path)."""
    k, n = x.shape[-1], weight.shape[0]
    p = float(dropout_p) if training else 0.0
    seed = _draw_seed() if p > 0 else torch.zeros((1,), dtype=torch.int64)
    x2 = x.reshape(-1, k)
    # the custom op is opaque to autocast: run it in the autocast dtype, as autocast would run the
    # base GEMM; the adapter weights keep their dtype (cast inside the kernels)
    x2, weight, bias, _ = dispatch.autocast_inputs(x.device.type, x2, weight, bias)
    why = triton_unsupported(x2.dtype, lora_A.shape[0], "rank r",
                             max(x2.shape[0] * n, x2.numel(), weight.numel()))
    if why is not None:
        triton_fallback_warning(OP, why)
        return lora_linear_torch(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    y, _ = _lora_triton_fwd(x2, weight, bias, lora_A, lora_B, float(scaling), p, seed)
    return y.view(*x.shape[:-1], n)


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


if _triton_importable():
    dispatch.register(OP, "triton", lora_linear_triton)


# ---------------------------------------------------------------------------------------------
# sibling projections on one input (q/k/v, gate/up): X read once on the triton backend
# ---------------------------------------------------------------------------------------------


class _BranchGroupTriton(torch.autograd.Function):
    """G sibling projections on one input through ``kernels.lora_group`` (eager only: under
    torch.compile the layers run the per-projection custom ops instead). Per member the flat
    arguments are (weight, bias, down/A, up/B, scaling); a scaling is a float or a learned tensor."""

    @staticmethod
    def forward(ctx, x2, dropout_p, activation, seeds, *flat):
        from fastadapters.kernels.lora_group import lora_group_fwd

        ws, bs, As, Bs, ss = (list(flat[i::5]) for i in range(5))
        ys, s_pad = lora_group_fwd(x2, ws, bs, As, Bs, ss, dropout_p, seeds, activation)
        tensor_scales = [sc for sc in ss if isinstance(sc, torch.Tensor)]
        ctx.save_for_backward(x2, s_pad, *ws, *As, *Bs, *tensor_scales)
        ctx.float_scales = [None if isinstance(sc, torch.Tensor) else sc for sc in ss]
        ctx.dropout_p, ctx.activation, ctx.seeds = dropout_p, activation, seeds
        ctx.has_bias = [b is not None for b in bs]
        ctx.set_materialize_grads(False)  # an unused member output costs no backward work
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        from fastadapters.kernels.lora_group import lora_group_bwd

        x2, s_pad, *rest = ctx.saved_tensors
        G = len(dys)
        ws, As, Bs = rest[:G], rest[G:2 * G], rest[2 * G:3 * G]
        tensor_scales = iter(rest[3 * G:])
        ss = [next(tensor_scales) if f is None else f for f in ctx.float_scales]
        need = ctx.needs_input_grad
        at = lambda g, i: need[4 + 5 * g + i]  # noqa: E731  (i: 0 weight, 1 bias, 2 down, 3 up, 4 scale)
        grads = [None, None, None, None]
        dx, dAs, dBs, dSs = None, [None] * G, [None] * G, [None] * G
        if need[0] or any(at(g, 2) or at(g, 3) or at(g, 4) for g in range(G)):
            dx, dAs, dBs, dSs = lora_group_bwd(list(dys), x2, list(ws), list(As), list(Bs), s_pad, ss,
                                               ctx.dropout_p, ctx.seeds, need_grad_x=bool(need[0]),
                                               activation=ctx.activation)
        grads[0] = dx if need[0] else None
        for g in range(G):
            dy = dys[g]
            dw = (dy.t() @ x2).to(ws[g].dtype) if (at(g, 0) and dy is not None) else None
            db = dy.sum(0) if (at(g, 1) and ctx.has_bias[g] and dy is not None) else None
            grads += [dw, db, dAs[g] if at(g, 2) else None, dBs[g] if at(g, 3) else None,
                      dSs[g] if at(g, 4) else None]
        return tuple(grads)


def branch_group_unsupported(op: str, x, widths, backend) -> str | None:
    """Why sibling projections with branch widths ``widths`` (ranks / bottleneck sizes) would run one
    by one here (None: they share the read of X)."""
    if dispatch.resolve(op, backend, x.device) != "triton":
        return "the shared read needs the triton backend"
    from fastadapters.kernels.lora_group import group_unsupported

    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    why = triton_unsupported(dtype, max(widths), "rank / bottleneck size")
    return why or group_unsupported(list(widths))


def branch_group(x, weights, biases, downs, ups, scalings, activation: int, dropout_p: float, training: bool):
    """The grouped triton path of ``lora_linear_group`` / ``parallel_linear_group`` (checked by the caller)."""
    k = x.shape[-1]
    p = float(dropout_p) if training else 0.0
    seeds = [int(_draw_seed().item()) if p > 0 else 0 for _ in weights]
    x2 = x.reshape(-1, k)
    flat = []
    for w, b, d, u, sc in zip(weights, biases, downs, ups, scalings):
        x2, w, b, _ = dispatch.autocast_inputs(x.device.type, x2, w, b)  # x2 is cast once, then kept
        flat += [w, b, d, u, sc if isinstance(sc, torch.Tensor) else float(sc)]
    ys = _BranchGroupTriton.apply(x2, p, activation, seeds, *flat)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def lora_linear_group(x, weights, biases, lora_As, lora_Bs, scalings, dropout_p: float = 0.0,
                      training: bool = False, backend: str | None = None) -> list[torch.Tensor]:
    """``[lora_linear(x, weights[g], biases[g], lora_As[g], lora_Bs[g], scalings[g], ...)]`` for
    sibling projections that take the same input (q/k/v, gate/up): on the triton backend X is read
    once for all of them (down projections, dA) and their dX is accumulated in place; elsewhere
    each member runs ``lora_linear``. Either way each member draws its own dropout seed, in order,
    as separate ``lora_linear`` calls would."""
    for w, b, a, bb in zip(weights, biases, lora_As, lora_Bs):
        check_lora_args(x, w, b, a, bb)
    if branch_group_unsupported(OP, x, [a.shape[0] for a in lora_As], backend) is not None:
        return [lora_linear(x, w, b, a, bb, s, dropout_p, training, backend)
                for w, b, a, bb, s in zip(weights, biases, lora_As, lora_Bs, scalings)]
    return branch_group(x, weights, biases, lora_As, lora_Bs, scalings, 0, dropout_p, training)
