"""Backend choice for every op: ``torch`` | ``triton`` | ``cuda`` | ``cpp``, picked once per call by one rule.

Each op family registers its implementations here (``register(op, backend, fn)``); ``resolve``
turns a request ("auto", an explicit name, or ``FASTADAPTERS_BACKEND``) into the backend that
runs. ``auto`` sends CUDA tensors to the fastest registered GPU backend, and CPU tensors to the
op's ``cpp`` backend where it has one (a C++ CPU kernel built on first use: today the
multi-adapter op of mixed batches) and to ``torch`` otherwise. An explicit backend that cannot run
raises an error that says why; a backend that ``auto`` wanted but cannot use falls back to
``torch`` with a one-time warning, never silently.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
ENV_VAR = "FASTADAPTERS_BACKEND"

_IMPLS: dict[str, dict[str, Callable]] = {}
# (op, backend) -> a callable returning None when that backend can run, else the reason (e.g. the
# ``cpp`` kernel's build failed); called by ``_usable``, so it must be cheap after its first call
_PROBES: dict[tuple[str, str], Callable[[], str | None]] = {}
_WARNED: set[tuple[str, str]] = set()
# Per-op preference among GPU backends for ``auto`` (measured tables may reorder this per op).
_AUTO_GPU_ORDER: dict[str, tuple[str, ...]] = {}


def register(op: str, backend: str, fn: Callable | None = None, probe: Callable[[], str | None] | None = None):
    """Register ``fn`` as ``op``'s implementation on ``backend`` (usable as a decorator); ``probe``:
    returns None when the backend can run here, else why not (checked before each use)."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend: got {backend!r}; valid: {', '.join(BACKENDS[1:])}")
    if probe is not None:
        _PROBES[(op, backend)] = probe

    def deco(f: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = f
        return f

    return deco(fn) if fn is not None else deco


def set_auto_order(op: str, order: tuple[str, ...]) -> None:
    _AUTO_GPU_ORDER[op] = order


def check_backend_name(backend: str | None) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


def requested_backend(backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r} is not a backend; valid: {', '.join(BACKENDS)}")
    return check_backend_name(backend)


def _warn_once(op: str, key: str, msg: str) -> None:
    if (op, key) not in _WARNED:
        _WARNED.add((op, key))
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _usable(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend not in _IMPLS.get(op, {}):
        have = ", ".join(sorted(_IMPLS.get(op, {}))) or "none"
        return f"op {op!r} has no {backend} implementation (has: {have})"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU"
    if backend == "cuda" and device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if backend == "cpp" and device.type != "cpu":
        return f"backend 'cpp' needs CPU tensors, got tensors on {device}"
    probe = _PROBES.get((op, backend))
    return probe() if probe is not None else None


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` under the request ``backend``."""
    backend = requested_backend(backend)
    if backend != "auto":
        why = _usable(op, backend, device)
        if why is not None:
            raise RuntimeError(f"cannot run {op} with backend={backend!r}: {why}")
        return backend
    if device.type == "cuda":
        reasons = []
        for cand in _AUTO_GPU_ORDER.get(op, ("triton", "cuda")):
            why = _usable(op, cand, device)
            if why is None:
                return cand
            reasons.append(why)
        _warn_once(op, "auto-gpu", f"fastadapters: {op} on CUDA runs the plain torch path "
                   f"(slower): {'; '.join(reasons)}")
    elif device.type == "cpu" and "cpp" in _IMPLS.get(op, {}):
        why = _usable(op, "cpp", device)
        if why is None:
            return "cpp"
        _warn_once(op, "auto-cpp", f"fastadapters: {op} on the CPU runs the plain torch path (slower): {why}")
    return "torch"


def plain_torch(backend: str | None, on_cuda: bool) -> bool:
    """Whether ``resolve`` certainly picks ``torch`` for an op that has a torch implementation and
    no ``cpp`` one (the single-adapter ops): an explicit "torch" request, or "auto" (the default)
    off CUDA. A quick test for per-call hot paths (the layers' direct call at decode time); False
    for everything else, which takes ``resolve`` (and its errors for a bad request)."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"
    return backend == "torch" or (backend == "auto" and not on_cuda)


def call(op: str, backend: str | None, device: torch.device, *args, **kwargs):
    return _IMPLS[op][resolve(op, backend, device)](*args, **kwargs)


def autocast_inputs(device_type: str, x, weight, bias):
    """(x, weight, bias, on): cast to the autocast dtype when autocast is on for ``device_type``.

    Ops whose base GEMM must follow autocast but that cannot let autocast cast each inner matmul
    (a fused kernel, an in-place fold) call this once and then run with autocast off; their
    adapter weights keep their own dtype.
    """
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias, False
    dt = torch.get_autocast_dtype(device_type)
    return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), True


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """Raise ``expected x of shape (*, 4096), got (37, 4095)``; None in ``expected`` matches any size."""
    shape = tuple(t.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"expected {name} of shape {exp}, got {shape}")
