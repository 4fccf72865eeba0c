"""The engine's LM head on the CPU: oneDNN's prepacked GEMM instead of ``F.linear``.

    head = lm_head(model, device)      # a PackedLMHead, or the model's own output layer
    logits = head(hidden)              # (rows, hidden) -> (rows, vocab)

The LM head is the largest single matmul of a decode step on a small model (SmolLM2-135M: a
49152 x 576 fp32 weight, 113 MB, read whole every step) and it is memory-bound. oneDNN reads a
weight reordered once into its blocked layout faster than MKL's ``sgemm`` reads the row-major
one: measured on a 2-core AMD EPYC, one thread, caches flushed between calls, 16 rows: 21 ms
against 34 ms (32 rows: 33 against 48) -- about a tenth of the engine's whole decode step. In
bfloat16 (where ``F.linear`` is oneDNN on the row-major weight already), without flushing: 1 row
1.5 against 3.3 ms, 8 rows 2.4 against 4.4, 32 rows 5.9 against 7.2.

The packed copy is extra memory (the vocab x hidden weight once more), so it is made only where
it pays and the engine asks for it (``pack``: the engine's weight-packing decision, ``cpu_gemm.py``):
a CPU model in float32 or bfloat16 whose output layer is a plain ``nn.Linear``, with oneDNN
available. The reorder and the GEMM are PyTorch's private oneDNN ops
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what Inductor's CPU
freezing pass emits); on construction the packed head is checked against ``F.linear`` on a random
input, and if the ops are missing or disagree it warns once, naming the torch version, and the
engine uses the plain layer. The weight's version counter is read on every call: a weight changed
in place (a merged adapter, a test) is repacked before it is used, never served stale.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PackedLMHead", "lm_head"]

_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class PackedLMHead:
    """``layer``'s forward through oneDNN's prepacked GEMM (see the module docstring)."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self._pack()

    def _pack(self) -> None:
        w = self.layer.weight.detach()
        self.weight, self.version = self.layer.weight, self.layer.weight._version
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        if w is not self.weight or w._version != self.version:
            self._pack()
        b = self.layer.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None if b is None else b.detach(), "none", [], "")


def lm_head(model: nn.Module, device: torch.device, pack: bool = True):
    """The callable the engine uses for the LM head: a checked ``PackedLMHead`` on the CPU where it
    applies and ``pack`` asks for it, else the model's output layer itself."""
    layer = model.get_output_embeddings()
    if not pack or torch.device(device).type != "cpu" or type(layer) is not nn.Linear:
        return layer
    if layer.weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return layer  # measured in these two only
    try:
        head = PackedLMHead(layer)
        x = torch.randn(3, layer.in_features, dtype=layer.weight.dtype, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = F.linear(x, layer.weight, layer.bias).float()
            got = head(x).float()
        tol = 1e-3 if layer.weight.dtype == torch.float32 else 2e-2  # bfloat16 outputs: rounded to 8 bits
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if got.shape != want.shape or not err <= tol:
            raise RuntimeError(f"its output differs from F.linear by {err:.2e} (relative; bound {tol:g})")
    except Exception as e:  # missing private op, a changed signature, wrong numbers: the plain layer
        _warn_once(str(type(e)), f"fastadapters serving: the oneDNN-packed LM head is unavailable on torch "
                                 f"{torch.__version__} ({type(e).__name__}: {e}); the engine uses the plain "
                                 "F.linear LM head (about 1.6x slower on the CPU)")
        return layer
    return head
