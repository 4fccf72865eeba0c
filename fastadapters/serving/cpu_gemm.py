"""The engine's linear layers on the CPU: oneDNN's GEMM instead of the default ``F.linear``.

    hooks = install(model)        # once, at engine start: the model's plain nn.Linear layers
    with hooks.active():          # the engine's forward only
        ...                       # their float32 calls with enough work go through oneDNN

On the CPU, ``F.linear`` in float32 runs MKL's ``sgemm``. oneDNN's GEMM, called on the same
row-major weight (no reordered copy, so no extra memory), is much faster at the row counts a
serving step has. Measured on the 2-core AMD EPYC these machines have (AVX-512), one thread,
SmolLM2-135M's seven linears of a layer x 30 layers, 32 rows: 90 ms with ``F.linear``, 53-61 ms
through oneDNN; per GEMM, oneDNN is 1.5-2.3x faster from 16 rows up (2.1-2.3x at 512, a prefill
chunk). With ``MKL_VERBOSE=1`` MKL names its code path on this AMD CPU "Intel(R) Architecture
processors" (its generic one; ``MKL_ENABLE_INSTRUCTIONS=AVX512`` changes nothing) while oneDNN
reports AVX-512: likely most of the gap (on an Intel CPU it may be small: not measured). Below a
few rows oneDNN's fixed cost per call loses (576 x 576 at one row: 0.74x; a 192 x 576 one: 0.4x),
while a large weight wins even at one row (4096 x 4096: 1.3x), so the choice is by the call's
work: oneDNN when rows x in x out >= ``MIN_WORK`` (2**21), the plain ``F.linear`` below.

Numerics: oneDNN sums in another order. Against float64, its float32 GEMM errs more than MKL's:
max abs 1.5-2.9x typically, 4.2x the worst seen (K = 1536); RMS 1.5-2.2x (K = 576 .. 4096).
SmolLM2-135M's logits over 4 x 200 tokens err 1.35x (RMS) / 1.54x (max) what the plain float32
model errs (``tests/serving/test_cpu_gemm.py`` holds the engine to at most 2x).

How it is hooked, and why so: ``install`` lists the plain ``nn.Linear`` layers (exactly that type,
float32, on the CPU, no forward of their own set on the instance). ``hooks.active()`` gives each of
them an instance ``forward`` (a ``OneDNNForward``, made once) for the block and takes it away after
it, also on an exception: outside the engine's forward the model is exactly as it was (its call
signature, ``torch.jit.script``, pickling and copies see nothing of this, and the layer -> hook ->
layer cycle exists only inside the block). Inside it, the hook calls oneDNN only on the thread that
entered (another thread running the model meanwhile gets ``F.linear``), without autograd or
autocast, on a float32 CPU input with enough work, with a contiguous weight and a contiguous bias of
the layer's width; every other call is ``F.linear`` as before. Setting and removing the hooks costs
~40 us a step (211 layers on SmolLM2). A torch.function mode would need no hook, but it intercepts
every torch call of the forward: it cost 20-25 ms of a 160 ms step. The op is PyTorch's private
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

__all__ = ["MIN_WORK", "LinearHooks", "OneDNNForward", "install"]

MIN_WORK = 1 << 21  # rows x in x out at which oneDNN's GEMM beats F.linear (module docstring)

_SCOPE = threading.local()
_WARNED: set[str] = set()


class OneDNNForward:
    """A plain ``nn.Linear``'s forward while ``LinearHooks.active()`` holds: oneDNN's GEMM on the
    thread inside the block where it pays, else ``F.linear`` (the module docstring)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear.forward's parameter name)
        m = self.module
        w, b = m.weight, m.bias
        if getattr(_SCOPE, "on", False) and input.dtype is torch.float32 and w.dtype is torch.float32 \
                and input.device.type == "cpu" and w.device.type == "cpu" and input.dim() >= 2 \
                and not torch.is_grad_enabled() and w.is_contiguous() and not torch.is_autocast_enabled("cpu") \
                and (b is None or (b.dtype is torch.float32 and b.shape == w.shape[:1] and b.is_contiguous())):
            k = input.shape[-1]
            rows = input.numel() // k if k else 0
            if rows and rows * k * w.shape[0] >= MIN_WORK:
                x = input.reshape(rows, k).contiguous()
                return _onednn_linear(x, w, b).view(*input.shape[:-1], w.shape[0])
        return F.linear(input, w, b)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D float32 CPU ``x`` through oneDNN (the module docstring)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class LinearHooks:
    """A model's plain float32 CPU linears, hooked for the length of ``active()`` (the engine keeps
    this beside the model it holds anyway: a layer replaced in the model later stays referenced
    here, unused, for the engine's life)."""

    def __init__(self, layers: list[nn.Linear]):
        self._hooks = [OneDNNForward(m) for m in layers]

    def __len__(self) -> int:
        return len(self._hooks)

    @contextlib.contextmanager
    def active(self):
        """Within the block the layers run ``OneDNNForward`` (oneDNN on this thread); after it, as
        before. A layer that meanwhile got a forward of its own is left alone; nested blocks add and
        remove only their own hooks."""
        added = []
        before = getattr(_SCOPE, "on", False)
        try:
            for fwd in self._hooks:
                m = fwd.module
                if "forward" not in m.__dict__:
                    m.__dict__["forward"] = fwd
                    added.append(m)
            _SCOPE.on = True
            yield
        finally:
            _SCOPE.on = before
            for m in added:
                if isinstance(m.__dict__.get("forward"), OneDNNForward):
                    del m.__dict__["forward"]


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


def install(model: nn.Module) -> LinearHooks:
    """``model``'s plain float32 CPU ``nn.Linear`` layers, to hook inside ``active()`` (see the module
    docstring); none where oneDNN's op is missing or wrong (warned once). Changes nothing on the model."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu" and "forward" not in m.__dict__]
    if not layers or not _op_works():
        return LinearHooks([])
    return LinearHooks(layers)
