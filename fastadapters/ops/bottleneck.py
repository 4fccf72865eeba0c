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
    zf = z if z.dtype == down.dtype else z.to(down.dtype)
    if training and dropout_p > 0:
        zf = F.dropout(zf, dropout_p, True)
    out = ACT_FNS[act](zf @ down.t()) @ up.t()
    out = out * scaling if isinstance(scaling, torch.Tensor) else (out if scaling == 1.0 else out * scaling)
    return out if out.dtype == z.dtype else out.to(z.dtype)


def _linear(x2, base):
    if callable(base):
        return base(x2)
    weight, bias = base
    return torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()


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
        return bottleneck_linear_torch(placement, x, base, down, up, scaling, act, float(dropout_p), bool(training))
    return dispatch.call(op, backend, x.device, x, base, down, up, scaling, act, float(dropout_p), bool(training))


def mh_adapter_linear(x, base, down, up, scaling, act="tanh", dropout_p=0.0, training=False, backend=None):
    return bottleneck_linear("mh", x, base, down, up, scaling, act, dropout_p, training, backend)


def output_adapter_linear(x, base, down, up, scaling, act="tanh", dropout_p=0.0, training=False, backend=None):
    return bottleneck_linear("output", x, base, down, up, scaling, act, dropout_p, training, backend)


def parallel_adapter_linear(x, base, down, up, scaling, act="tanh", dropout_p=0.0, training=False, backend=None):
    return bottleneck_linear("parallel", x, base, down, up, scaling, act, dropout_p, training, backend)
