"""Review: a bottleneck op whose base is an opaque callable honours the backend request.

A callable base can only run the torch composition. That must not make the ``backend`` argument
(or FASTADAPTERS_BACKEND) meaningless: a name that is not a backend is a ValueError, and an explicit
GPU backend that cannot take the call is an error that says why -- as for a (weight, bias) base --
instead of a silent switch to the torch path. ``auto`` and ``torch`` run it.
"""
from __future__ import annotations

import pytest
import torch

from fastadapters.ops import dispatch
from fastadapters.ops.bottleneck import bottleneck_linear, bottleneck_linear_ref


def _args(placement):
    g = torch.Generator().manual_seed(0)
    k, n, b = 8, 6, 3
    d_in = n if placement == "output" else k
    d_out = k if placement == "mh" else n
    x = torch.randn(5, k, generator=g, dtype=torch.float64)
    w, bias = torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    down = torch.randn(b, d_in, generator=g, dtype=torch.float64)
    up = torch.randn(d_out, b, generator=g, dtype=torch.float64)
    return x, w, bias, down, up


@pytest.mark.parametrize("placement", ["mh", "output", "parallel"])
def test_callable_base_checks_the_backend(placement, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, w, bias, down, up = _args(placement)
    lin = lambda t: t @ w.t() + bias  # noqa: E731
    exp = bottleneck_linear_ref(placement, x, w, bias, down, up, 0.5, "tanh")
    for backend in (None, "auto", "torch"):
        torch.testing.assert_close(bottleneck_linear(placement, x, lin, down, up, 0.5, backend=backend), exp)
    with pytest.raises(ValueError, match=r"backend: got 'gpu'; valid: auto, torch, triton, cuda"):
        bottleneck_linear(placement, x, lin, down, up, 0.5, backend="gpu")
    for backend in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=rf"backend='{backend}'.*callable"):
            bottleneck_linear(placement, x, lin, down, up, 0.5, backend=backend)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=r"backend='cuda'.*callable"):
        bottleneck_linear(placement, x, lin, down, up, 0.5)
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"FASTADAPTERS_BACKEND='fast'"):
        bottleneck_linear(placement, x, lin, down, up, 0.5)
