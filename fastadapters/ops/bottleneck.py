"""Bottleneck adapter ops (LLM-Adapters' series and parallel adapters), the three placements.

Semantics (z (..., d_in), D (b, d_in), U (d_out, b), s a float or a learned 0-d tensor)::

    f(z) = U @ act(D @ dropout(z))           # in the adapter dtype (fp32), cast back to z's dtype
    mh_adapter       y = W (x + s f(x)) + b   # d_out == d_in == K
    output_adapter   h = W x + b;  y = h + s f(h)   # d_in == d_out == N
    parallel_adapter y = W x + b + s f(x)     # d_in == K, d_out == N

act is one of tanh, relu, gelu (exact erf), silu/swish, sigmoid. ``*_ref`` functions state the
semantics in plain torch; ``mh_adapter_linear`` / ``output_adapter_linear`` /
``parallel_adapter_linear`` check shapes and dispatch to a backend. ``base`` is either a
(weight, bias) pair for a linear (weight may be a transposed view) or a callable, for base modules
no kernel understands; a callable always takes the torch path.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import dispatch

ACT_FNS: dict[str, Callable] = {
    "identity": lambda t: t,
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
}
# Integer ids used by kernels (and the multi-adapter store); "swish" is an alias of silu.
ACT_IDS: dict[str, int] = {"identity": 0, "tanh": 1, "relu": 2, "gelu": 3, "silu": 4, "swish": 4, "sigmoid": 5}

PLACEMENTS = ("mh", "output", "parallel")


def bottleneck_branch_ref(z, down, up, scaling, act: str, dropout_mask=None, dropout_p: float = 0.0):
    """s * U act(D dropout(z)), computed in the adapter dtype and cast back to z.dtype."""
    zf = z.to(down.dtype)
    if dropout_mask is not None:
        zf = zf * dropout_mask.to(zf.dtype) / (1.0 - dropout_p)
    return (ACT_FNS[act](zf @ down.t()) @ up.t() * scaling).to(z.dtype)


def bottleneck_linear_ref(placement: str, x, weight, bias, down, up, scaling, act: str,
                          dropout_mask=None, dropout_p: float = 0.0):
    """The three placements in plain torch (the formulas in the module docstring)."""
    def lin(t):
        y = t @ weight.t()
        return y if bias is None else y + bias

    if placement == "mh":
        return lin(x + bottleneck_branch_ref(x, down, up, scaling, act, dropout_mask, dropout_p))
    if placement == "output":
        h = lin(x)
        return h + bottleneck_branch_ref(h, down, up, scaling, act, dropout_mask, dropout_p)
    if placement == "parallel":
        return lin(x) + bottleneck_branch_ref(x, down, up, scaling, act, dropout_mask, dropout_p)
    raise ValueError(f"placement: got {placement!r}; valid: {', '.join(PLACEMENTS)}")


# ---------------------------------------------------------------------------------------------
# torch path
# ---------------------------------------------------------------------------------------------

def _branch_torch(z, down, up, scaling, act: str, dropout_p: float, training: bool):
    dev = z.device.type
    if torch.is_autocast_enabled(dev):  # f is computed in the adapter dtype (fp32), autocast or not
        with torch.autocast(dev, enabled=False):
            return _branch_torch(z, down, up, scaling, act, dropout_p, training)
    zf = z if z.dtype == down.dtype else z.to(down.dtype)
    if training and dropout_p > 0:
        zf = F.dropout(zf, dropout_p, True)
    out = F.linear(ACT_FNS[act](F.linear(zf, down)), up)  # 2-D: z·Dᵀ, then ·Uᵀ (one call each)
    out = out * scaling if isinstance(scaling, torch.Tensor) else (out if scaling == 1.0 else out * scaling)
    return out if out.dtype == z.dtype else out.to(z.dtype)


def _linear(x2, base):
    if callable(base):
        return base(x2)
    return F.linear(x2, *base)  # 2-D: addmm(bias, x2, Wᵀ), or mm without a bias


def bottleneck_linear_torch(placement: str, x, base, down, up, scaling, act: str, dropout_p: float,
                            training: bool):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if placement == "mh":
        y = _linear(x2 + _branch_torch(x2, down, up, scaling, act, dropout_p, training), base)
    elif placement == "output":
        h = _linear(x2, base)
        y = h + _branch_torch(h, down, up, scaling, act, dropout_p, training)
    else:  # parallel: a fresh addmm output takes the branch in place
        y = _linear(x2, base)
        br = _branch_torch(x2, down, up, scaling, act, dropout_p, training)
        y = y + br if callable(base) else y.add_(br)
    return y.view(*x.shape[:-1], y.shape[-1])


for _p in PLACEMENTS:
    dispatch.register(f"bottleneck_{_p}", "torch",
                      lambda x, base, *a, _p=_p: bottleneck_linear_torch(_p, x, base, *a))


def check_bottleneck_args(placement: str, x, base, down, up, act: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement: got {placement!r}; valid: {', '.join(PLACEMENTS)}")
    if act not in ACT_FNS or act == "identity":
        raise ValueError(f"act: got {act!r}; valid: tanh, relu, gelu, silu, swish, sigmoid")
    k = x.shape[-1]
    if not callable(base):
        weight, bias = base
        n = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != k:
            raise ValueError(f"expected weight of shape (N, {k}), got {tuple(weight.shape)}")
        if bias is not None:
            dispatch.check_shape("bias", bias, (n,))
    else:
        n = None
    d_in = {"mh": k, "output": n, "parallel": k}[placement]
    d_out = {"mh": k, "output": n, "parallel": n}[placement]
    dispatch.check_shape("down", down, (None, d_in))
    dispatch.check_shape("up", up, (d_out, down.shape[0]))


def bottleneck_linear(placement: str, x, base, down, up, scaling, act: str = "tanh",
                      dropout_p: float = 0.0, training: bool = False, backend: str | None = None):
    """One placement of a bottleneck adapter around a base linear (see the module docstring)."""
    check_bottleneck_args(placement, x, base, down, up, act)
    op = f"bottleneck_{placement}"
    if callable(base):  # an opaque base module: only the torch composition can wrap it
        requested = dispatch.requested_backend(backend)
        if requested not in ("auto", "torch"):
            raise RuntimeError(f"cannot run {op} with backend={requested!r}: a base given as a callable runs "
                               "only the torch composition; pass base=(weight, bias) for the kernels")
        if requested == "auto" and x.device.type == "cuda":
            dispatch._warn_once(op, "callable-base", f"fastadapters: {op} on CUDA runs the plain torch path "
                                "(slower): its base is an opaque callable; pass base=(weight, bias) for the kernels")
        return bottleneck_linear_torch(placement, x, base, down, up, scaling, act, float(dropout_p), bool(training))
    return dispatch.call(op, backend, x.device, x, base, down, up, scaling, act, float(dropout_p), bool(training))


def mh_adapter_linear(x, base, down, up, scaling, act="tanh", dropout_p=0.0, training=False, backend=None):
    return bottleneck_linear("mh", x, base, down, up, scaling, act, dropout_p, training, backend)


def output_adapter_linear(x, base, down, up, scaling, act="tanh", dropout_p=0.0, training=False, backend=None):
    return bottleneck_linear("output", x, base, down, up, scaling, act, dropout_p, training, backend)


def parallel_adapter_linear(x, base, down, up, scaling, act="tanh", dropout_p=0.0, training=False, backend=None):
    return bottleneck_linear("parallel", x, base, down, up, scaling, act, dropout_p, training, backend)


# ---------------------------------------------------------------------------------------------
# triton path: fastadapters.kernels.bottleneck behind torch.library custom ops
# ---------------------------------------------------------------------------------------------
#
# residual ops (z -> z + s f(z)) serve the output placement (on h = base(x)) and the mh placement
# (on x, then the base linear in torch); the parallel ops fuse the branch into the base GEMM.
# A learned scaling is passed as a tensor (read on the device, its gradient computed in-kernel);
# a float scaling as `scaling_val`. Dropout: a 1-element int64 CPU seed tensor drawn from torch's
# default generator outside the op; the kernels regenerate the Philox mask in the backward. The
# branch runs in z's dtype on the tensor cores (fp32 adapter weights are rounded to z's dtype for
# the dots, accumulation in fp32; the adapters' gradients come back in their dtype).

from .lora import branch_group, branch_group_unsupported, triton_fallback_warning, triton_unsupported  # noqa: E402,E501

Tensor = torch.Tensor


def _scale_arg(scaling, scaling_val):
    return scaling if scaling is not None else scaling_val


def _empty_scale_grad(like):
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("fastadapters::bottleneck_residual_triton_fwd", mutates_args=())
def _residual_triton_fwd(z: Tensor, down: Tensor, up: Tensor, scaling: Tensor | None, scaling_val: float,
                         act: str, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    from fastadapters.kernels.bottleneck import bottleneck_residual_fwd

    return bottleneck_residual_fwd(z, down, up, _scale_arg(scaling, scaling_val), act, dropout_p,
                                   int(seed.item()))


@_residual_triton_fwd.register_fake
def _(z, down, up, scaling, scaling_val, act, dropout_p, seed):
    return torch.empty_like(z), z.new_empty((z.shape[0], down.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastadapters::bottleneck_residual_triton_bwd", mutates_args=())
def _residual_triton_bwd(grad_y: Tensor, z: Tensor, pre: Tensor, down: Tensor, up: Tensor, scaling: Tensor | None,
                         scaling_val: float, act: str, dropout_p: float, seed: Tensor,
                         need_grad_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastadapters.kernels.bottleneck import bottleneck_residual_bwd

    dz, dd, du, ds = bottleneck_residual_bwd(grad_y.contiguous(), z, pre, down, up,
                                             _scale_arg(scaling, scaling_val), act, dropout_p,
                                             int(seed.item()), need_grad_z=need_grad_z)
    return (dz if dz is not None else z.new_empty((0,)), dd, du,
            ds if ds is not None else _empty_scale_grad(z))


@_residual_triton_bwd.register_fake
def _(grad_y, z, pre, down, up, scaling, scaling_val, act, dropout_p, seed, need_grad_z):
    ds = torch.empty_like(scaling) if scaling is not None else _empty_scale_grad(z)
    return (torch.empty_like(z) if need_grad_z else z.new_empty((0,)), torch.empty_like(down),
            torch.empty_like(up), ds)


def _residual_setup(ctx, inputs, output):
    z, down, up, scaling, scaling_val, act, dropout_p, seed = inputs
    ctx.save_for_backward(z, output[1], down, up, scaling, seed)
    ctx.scaling_val, ctx.act, ctx.dropout_p = scaling_val, act, dropout_p
    ctx.mark_non_differentiable(output[1])


def _residual_backward(ctx, grad_y, grad_pre):
    z, pre, down, up, scaling, seed = ctx.saved_tensors
    need_z, need_d, need_u, need_s = ctx.needs_input_grad[:4]
    if not (need_z or need_d or need_u or need_s):
        return (None,) * 8
    dz, dd, du, ds = _residual_triton_bwd(grad_y, z, pre, down, up, scaling, ctx.scaling_val, ctx.act,
                                          ctx.dropout_p, seed, bool(need_z))
    return (dz if need_z else None, dd if need_d else None, du if need_u else None,
            ds if need_s else None, None, None, None, None)


_residual_triton_fwd.register_autograd(_residual_backward, setup_context=_residual_setup)


@torch.library.custom_op("fastadapters::bottleneck_parallel_triton_fwd", mutates_args=())
def _parallel_triton_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor,
                         scaling: Tensor | None, scaling_val: float, act: str, dropout_p: float,
                         seed: Tensor) -> tuple[Tensor, Tensor]:
    from fastadapters.kernels.bottleneck import bottleneck_parallel_fwd

    return bottleneck_parallel_fwd(x, weight, bias, down, up, _scale_arg(scaling, scaling_val), act,
                                   dropout_p, int(seed.item()))


@_parallel_triton_fwd.register_fake
def _(x, weight, bias, down, up, scaling, scaling_val, act, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], down.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fastadapters::bottleneck_parallel_triton_bwd", mutates_args=())
def _parallel_triton_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, pre: Tensor, down: Tensor, up: Tensor,
                         scaling: Tensor | None, scaling_val: float, act: str, dropout_p: float, seed: Tensor,
                         need_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from fastadapters.kernels.bottleneck import bottleneck_parallel_bwd

    dx, dd, du, ds = bottleneck_parallel_bwd(grad_y.contiguous(), x, weight, pre, down, up,
                                             _scale_arg(scaling, scaling_val), act, dropout_p,
                                             int(seed.item()), need_grad_x=need_grad_x)
    return (dx if dx is not None else x.new_empty((0,)), dd, du,
            ds if ds is not None else _empty_scale_grad(x))


@_parallel_triton_bwd.register_fake
def _(grad_y, x, weight, pre, down, up, scaling, scaling_val, act, dropout_p, seed, need_grad_x):
    ds = torch.empty_like(scaling) if scaling is not None else _empty_scale_grad(x)
    return (torch.empty_like(x) if need_grad_x else x.new_empty((0,)), torch.empty_like(down),
            torch.empty_like(up), ds)


def _parallel_setup(ctx, inputs, output):
    x, weight, bias, down, up, scaling, scaling_val, act, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, output[1], down, up, scaling, seed)
    ctx.scaling_val, ctx.act, ctx.dropout_p, ctx.has_bias = scaling_val, act, dropout_p, bias is not None
    ctx.mark_non_differentiable(output[1])


def _parallel_backward(ctx, grad_y, grad_pre):
    x, weight, pre, down, up, scaling, seed = ctx.saved_tensors
    need_x, need_w, need_b, need_d, need_u, need_s = ctx.needs_input_grad[:6]
    dx = dw = db = dd = du = ds = None
    if need_x or need_d or need_u or need_s:
        dx, dd, du, ds = _parallel_triton_bwd(grad_y, x, weight, pre, down, up, scaling, ctx.scaling_val,
                                              ctx.act, ctx.dropout_p, seed, bool(need_x))
        dx, dd, du, ds = (dx if need_x else None, dd if need_d else None, du if need_u else None,
                          ds if need_s else None)
    if need_w:  # an unfrozen base weight: plain GEMM, the kernels assume it frozen
        dw = (grad_y.t() @ x).to(weight.dtype)
    if need_b and ctx.has_bias:
        db = grad_y.sum(0)
    return dx, dw, db, dd, du, ds, None, None, None, None


_parallel_triton_fwd.register_autograd(_parallel_backward, setup_context=_parallel_setup)


def _draw_seed(p: float) -> Tensor:
    if p > 0:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    return torch.zeros((1,), dtype=torch.int64)


def bottleneck_linear_triton(placement: str, x, base, down, up, scaling, act: str, dropout_p: float,
                             training: bool):
    """The triton backend of the three placements (same arguments as the torch path)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    p = float(dropout_p) if training else 0.0
    seed = _draw_seed(p)
    s_t, s_val = (scaling, 1.0) if isinstance(scaling, torch.Tensor) else (None, float(scaling))
    if not callable(base):
        # the custom ops are opaque to autocast: run the GEMMs in the autocast dtype, as autocast
        # would run the base linear; the adapter weights keep their dtype (cast inside the kernels)
        x2, weight, bias, _ = dispatch.autocast_inputs(x.device.type, x2, *base)
        base = (weight, bias)
    n_out = up.shape[0]
    why = triton_unsupported(x2.dtype, down.shape[0], "bottleneck size", max(x2.shape[0] * n_out, x2.numel()))
    if why is not None:
        triton_fallback_warning(f"bottleneck_{placement}", why)
        return bottleneck_linear_torch(placement, x, base, down, up, scaling, act, dropout_p, training)
    if placement == "mh":
        xp, _ = _residual_triton_fwd(x2, down, up, s_t, s_val, act, p, seed)
        y = _linear(xp, base)
    elif placement == "output":
        y, _ = _residual_triton_fwd(_linear(x2, base), down, up, s_t, s_val, act, p, seed)
    else:
        weight, bias = base
        y, _ = _parallel_triton_fwd(x2, weight, bias, down, up, s_t, s_val, act, p, seed)
    return y.view(*x.shape[:-1], y.shape[-1])


def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


if _triton_importable():
    for _p in PLACEMENTS:
        dispatch.register(f"bottleneck_{_p}", "triton",
                          lambda x, base, *a, _p=_p: bottleneck_linear_triton(_p, x, base, *a))


def parallel_linear_group(x, weights, biases, downs, ups, scalings, act: str, dropout_p: float = 0.0,
                          training: bool = False, backend: str | None = None) -> list[torch.Tensor]:
    """``[bottleneck_linear("parallel", x, (weights[g], biases[g]), downs[g], ups[g], scalings[g], act,
    ...)]`` for sibling projections on one input (parallel adapters on q/k/v): on the triton backend X
    is read once for all of them (``lora.branch_group``, the LoRA kernels with the activation on),
    elsewhere each member runs on its own; each member draws its own dropout seed, in order."""
    for w, b, d, u in zip(weights, biases, downs, ups):
        check_bottleneck_args("parallel", x, (w, b), d, u, act)
    if branch_group_unsupported("bottleneck_parallel", x, [d.shape[0] for d in downs], backend) is not None:
        return [bottleneck_linear("parallel", x, (w, b), d, u, sc, act, dropout_p, training, backend)
                for w, b, d, u, sc in zip(weights, biases, downs, ups, scalings)]
    from fastadapters.kernels._common import activation_id

    return branch_group(x, weights, biases, downs, ups, scalings, activation_id(act), dropout_p, training)
