"""The engine's linear layers on the CPU: oneDNN's GEMM instead of the default ``F.linear``.

    n = install(model)            # once, at engine start: the model's plain nn.Linear layers
    with active():                # the engine's forward only
        ...                       # their float32 calls with enough work go through oneDNN

On the CPU, ``F.linear`` in float32 runs MKL's ``sgemm``. oneDNN's GEMM, called on the same
row-major weight (no reordered copy, so no extra memory), is much faster at the row counts a
serving step has. Measured on the 2-core AMD EPYC these machines have (AVX-512), one thread,
SmolLM2-135M's seven linears of a layer x 30 layers, 32 rows: 90 ms with ``F.linear``, 53-61 ms
through oneDNN; per GEMM, oneDNN is 1.5-2.3x faster from 16 rows up (2.1-2.3x at 512, a prefill
chunk). With ``MKL_VERBOSE=1`` MKL names its code path on this AMD CPU "Intel(R) Architecture
processors" (its generic one; ``MKL_ENABLE_INSTRUCTIONS=AVX512`` changes nothing) while oneDNN
reports AVX-512: likely most of the gap (on an Intel CPU it may be small: not measured). Below a few
rows oneDNN's fixed cost per call loses (576 x 576 at one row: 0.74x; a 192 x 576 one: 0.4x),
while a large weight wins even at one row (4096 x 4096: 1.3x), so the choice is by the call's
work: oneDNN when rows x in x out >= ``MIN_WORK`` (2**21), the plain ``F.linear`` below.

Numerics: oneDNN sums in another order. Against float64, its float32 GEMM errs more than MKL's:
max abs 1.5-2.9x typically, 4.2x the worst seen (K = 1536); RMS 1.5-2.2x (K = 576 .. 4096).
SmolLM2-135M's logits over 4 x 200 tokens err 1.35x (RMS) / 1.54x (max) what the plain float32
model errs (``tests/serving/test_cpu_gemm.py`` holds the engine to at most 2x).

How it is hooked, and why so: each plain ``nn.Linear`` (exactly that type, float32, on the CPU,
no forward of its own already set on the instance) gets an instance ``forward``, a ``OneDNNForward``
that calls oneDNN only inside ``active()`` on the thread that entered it, without autograd, on a
float32 CPU input with enough work; everything else is ``F.linear`` as before. So the model
computes as it always did outside the engine's forward (Hugging Face's ``generate`` on the same
model, training, another thread), and a copy of the model (``copy.deepcopy``) gets hooks on its
own layers. A torch.function mode would need no hook, but it intercepts every torch call of the
forward: it cost 20-25 ms of a 160 ms step. The op is PyTorch's private
``torch.ops.mkldnn._linear_pointwise`` (what Inductor's CPU freezing emits, and what the LM head
uses packed, ``lm_head.py``): ``install`` checks it against ``F.linear`` first, and where it is
missing or disagrees it warns once, naming the torch version, and hooks nothing.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MIN_WORK", "OneDNNForward", "active", "install"]

MIN_WORK = 1 << 21  # rows x in x out at which oneDNN's GEMM beats F.linear (module docstring)

_SCOPE = threading.local()
_WARNED: set[str] = set()


class OneDNNForward:
    """A plain ``nn.Linear``'s forward: oneDNN's GEMM inside ``active()`` where it pays, else
    ``F.linear``. An object, not a closure, so that ``copy.deepcopy`` of the model points the copy
    at the copied layer."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        w, b = m.weight, m.bias
        if getattr(_SCOPE, "on", False) and x.dtype is torch.float32 and w.dtype is torch.float32 \
                and x.device.type == "cpu" and w.device.type == "cpu" and x.dim() >= 2 \
                and not torch.is_grad_enabled() and w.is_contiguous():
            k = x.shape[-1]
            rows = x.numel() // k if k else 0
            if rows * k * w.shape[0] >= MIN_WORK:
                return _onednn_linear(x.reshape(rows, k).contiguous(), w, b).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, b)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D float32 CPU ``x`` through oneDNN (the module docstring)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@contextlib.contextmanager
def active(on: bool = True):
    """Within the block, on this thread, hooked layers may call oneDNN."""
    before = getattr(_SCOPE, "on", False)
    _SCOPE.on = bool(on)
    try:
        yield
    finally:
        _SCOPE.on = before


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _op_works() -> bool:
    """oneDNN's op is there and agrees with F.linear on a random float32 input (once per process)."""
    global _CHECKED
    if _CHECKED is None:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("oneDNN (mkldnn) is not available in this torch build")
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((37, 130), (70, 130), (70,)))
            with torch.no_grad():
                want = F.linear(x.double(), w.double(), b.double())
                got = _onednn_linear(x, w, b).double()
            err = float((got - want).abs().max() / want.abs().max())
            if got.shape != want.shape or not err <= 1e-5:
                raise RuntimeError(f"its output differs from F.linear by {err:.2e} (relative; bound 1e-05)")
            _CHECKED = True
        except Exception as e:  # a missing private op, a changed signature, wrong numbers
            _CHECKED = False
            _warn_once("op", f"fastadapters serving: oneDNN's linear op is unavailable on torch {torch.__version__} "
                             f"({type(e).__name__}: {e}); the engine's linears run F.linear (MKL), about 1.6x "
                             "slower on the CPU at 32 rows")
    return _CHECKED


_CHECKED: bool | None = None


def install(model: nn.Module) -> int:
    """Hook ``model``'s plain float32 CPU ``nn.Linear`` layers (see the module docstring); returns
    how many are hooked now (those hooked before included). Safe to call again: a layer is hooked
    once, and a layer with its own instance forward is left alone."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu"]
    if not layers or not _op_works():
        return 0
    n = 0
    for m in layers:
        fwd = m.__dict__.get("forward")
        if fwd is None:
            m.forward = OneDNNForward(m)
            n += 1
        elif isinstance(fwd, OneDNNForward):
            n += 1
    return n
