"""The engine's linear layers on the CPU: oneDNN's GEMM instead of the default ``F.linear``.

    hooks = install(model, pack=True)   # once, at engine start: the model's plain nn.Linear layers
    with hooks.active():                # the engine's forward only
        ...                             # their calls go through oneDNN where it pays

On the CPU, ``F.linear`` in float32 runs MKL's ``sgemm``. oneDNN's GEMM is much faster at the row
counts a serving step has, and faster still on a weight reordered once into its blocked layout
("packed"). Measured on the 2-core AMD EPYC these machines have (AVX-512), one thread, SmolLM2-135M's
seven linears of a layer x 30 layers (distinct weights, so read from memory as in a real step):

  rows            1     2     8    32    64   128   192   512
  float32
    F.linear   25.2  38.3  44.6   90     -  274   409  1027   ms
    row-major  20.4  30.1  31.8  52.4  78.0  134   219   477
    packed     19.7  16.5  19.7  41.3  67.7  120   177   539
  bfloat16 (F.linear is oneDNN on the row-major weight already)
    F.linear   15.8     -  17.8  35.0  43.8  68.2  95.1   235
    packed      8.8   9.4  11.8  22.5  35.2  62.9  87.9   235

So a call of at most ``PACKED_MAX_ROWS`` (256) rows uses the packed weight (float32 and bfloat16),
and a larger one (prefill chunks) the row-major weight: oneDNN in float32 when rows x in x out >=
``MIN_WORK`` (2**21; below that oneDNN's fixed cost per call loses to MKL), ``F.linear`` otherwise.
With ``MKL_VERBOSE=1`` MKL names its code path on this AMD CPU "Intel(R) Architecture processors"
(its generic one; ``MKL_ENABLE_INSTRUCTIONS=AVX512`` changes nothing) while oneDNN reports AVX-512:
likely most of the gap (on an Intel CPU it may be small: not measured).

The packed copies are extra memory: the hooked weights once more (SmolLM2-135M: 424 MB in float32).
``install(pack=True)`` makes them; the engine decides (``Engine(pack_weights=...)``, ``serve
--weight-packing``): by default it packs when the copies, with the LM head's (``lm_head.py``), take at
most half the memory the system has available, and otherwise warns once and runs the row-major
weights. A packed weight remembers the tensor and version counter it was made from and is made
again before use when either changed (an adapter merged in place, a weight replaced), never served
stale. The output layer is not packed here (``lm_head.py`` packs it for the engine's own LM head).

Numerics: oneDNN sums in another order than MKL. Against float64, its float32 GEMM errs more than
MKL's: max abs 1.5-2.9x typically, 4.2x the worst seen (K = 1536); RMS 1.5-2.2x (K = 576 .. 4096).
The packed weight gives the same bits as the row-major one from 5 rows up. SmolLM2-135M's logits
over 4 x 200 tokens err 1.35x (RMS) / 1.54x (max) what the plain float32 model errs
(``tests/serving/test_cpu_gemm.py`` holds the engine to at most 2x, bfloat16 too).

How it is hooked, and why so: ``install`` lists the plain ``nn.Linear`` layers (exactly that type,
float32 -- or bfloat16 when packing --, on the CPU, no forward of their own set on the instance).
``hooks.active()`` gives each of them an instance ``forward`` (a ``OneDNNForward``, made once) for
the block and takes it away after it, also on an exception: outside the engine's forward the model
is exactly as it was (its call signature, ``torch.jit.script``, pickling and copies see nothing of
this, and the layer -> hook -> layer cycle exists only inside the block). Inside it, the hook calls
oneDNN only on the thread that entered (another thread running the model meanwhile gets
``F.linear``), without autograd or autocast, on a CPU input of the weight's dtype, with a
contiguous weight and a contiguous bias of the layer's width and dtype; every other call is
``F.linear`` as before. Setting and removing the hooks costs ~40 us a step (211 layers on SmolLM2).
A torch.function mode would need no hook, but it intercepts every torch call of the forward: it
cost 20-25 ms of a 160 ms step. The ops are PyTorch's private ``torch.ops.mkldnn._linear_pointwise``
and ``_reorder_linear_weight`` (what Inductor's CPU freezing emits, and what the LM head uses,
``lm_head.py``): ``install`` checks them against ``F.linear`` first, and where the GEMM is missing
or disagrees it warns once, naming the torch version, and hooks nothing; where only packing fails,
it warns once and hooks the float32 layers unpacked.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MIN_WORK", "PACKED_MAX_ROWS", "LinearHooks", "OneDNNForward", "available_memory", "install", "packed_bytes",
           "weight_packing"]

MIN_WORK = 1 << 21  # rows x in x out at which oneDNN's GEMM beats F.linear (module docstring)
PACKED_MAX_ROWS = 256  # rows up to which the packed weight beats the row-major one (module docstring)

_SCOPE = threading.local()
_WARNED: set[str] = set()
_DTYPES = (torch.float32, torch.bfloat16)


class OneDNNForward:
    """A plain ``nn.Linear``'s forward while ``LinearHooks.active()`` holds: oneDNN's GEMM on the
    thread inside the block where it pays (its packed weight where it has one and the call has at
    most ``PACKED_MAX_ROWS`` rows), else ``F.linear`` (the module docstring)."""

    __slots__ = ("module", "packed", "_packed_from", "_version")

    def __init__(self, module: nn.Linear, pack: bool = False):
        self.module = module
        self.packed = self._packed_from = None
        self._version = -1
        if pack:
            self._pack(module.weight)

    def _pack(self, w: torch.Tensor) -> None:
        self.packed = _reorder(w.detach())
        self._packed_from, self._version = w, w._version

    def __call__(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear.forward's parameter name)
        m = self.module
        w, b = m.weight, m.bias
        dt = w.dtype
        if getattr(_SCOPE, "on", False) and input.dtype is dt and dt in _DTYPES \
                and input.device.type == "cpu" and w.device.type == "cpu" and input.dim() >= 2 \
                and not torch.is_grad_enabled() and w.is_contiguous() and not torch.is_autocast_enabled("cpu") \
                and (b is None or (b.dtype is dt and b.shape == w.shape[:1] and b.is_contiguous())):
            k = input.shape[-1]
            rows = input.numel() // k if k else 0
            if rows and self.packed is not None and rows <= PACKED_MAX_ROWS:
                if w is not self._packed_from or w._version != self._version:
                    self._pack(w)  # changed since it was packed: never the stale copy
                x = input.reshape(rows, k).contiguous()
                return _onednn_linear(x, self.packed, b).view(*input.shape[:-1], w.shape[0])
            if rows and dt is torch.float32 and rows * k * w.shape[0] >= MIN_WORK:
                x = input.reshape(rows, k).contiguous()
                return _onednn_linear(x, w, b).view(*input.shape[:-1], w.shape[0])
        return F.linear(input, w, b)


def _reorder(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out x in) reordered into oneDNN's blocked layout for its GEMM (the same bytes again)."""
    return torch.ops.mkldnn._reorder_linear_weight(w)


def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for a 2-D CPU ``x`` through oneDNN (``w`` row-major or packed)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class LinearHooks:
    """A model's plain CPU linears (``install``), hooked for the length of ``active()`` (the engine
    keeps this beside the model it holds anyway: a layer replaced in the model later stays
    referenced here, unused, for the engine's life)."""

    def __init__(self, hooks: list[OneDNNForward]):
        self._hooks = hooks

    def __len__(self) -> int:
        return len(self._hooks)

    @property
    def packed(self) -> int:
        """How many of the layers have a packed weight."""
        return sum(h.packed is not None for h in self._hooks)

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


def _check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pack: bool) -> None:
    """oneDNN's GEMM on ``w`` (packed first when ``pack``) agrees with an fp64 ``F.linear``."""
    with torch.no_grad():
        want = F.linear(x.double(), w.double(), b.double())
        got = _onednn_linear(x, _reorder(w) if pack else w, b).double()
    bound = 1e-5 if w.dtype is torch.float32 else 2e-2
    err = float((got - want).abs().max() / want.abs().max())
    if got.shape != want.shape or not err <= bound:
        raise RuntimeError(f"its {w.dtype} output differs from F.linear by {err:.2e} (relative; bound {bound:g})")


def _op_works(pack: bool = False) -> bool:
    """oneDNN's op is there and agrees with F.linear on a random float32 input (once per process);
    with ``pack``: its packed weights too, in float32 and bfloat16."""
    global _CHECKED
    if _CHECKED is None:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("oneDNN (mkldnn) is not available in this torch build")
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(s, generator=g) for s in ((37, 130), (70, 130), (70,)))
            _check(x, w, b, pack=False)
            _CHECKED = True
        except Exception as e:  # a missing private op, a changed signature, wrong numbers
            _CHECKED = False
            _warn_once("op", f"fastadapters serving: oneDNN's linear op is unavailable on torch {torch.__version__} "
                             f"({type(e).__name__}: {e}); the engine's linears run F.linear (MKL), about 1.6x "
                             "slower on the CPU at 32 rows")
    if not _CHECKED or not pack:
        return bool(_CHECKED)
    global _PACK_CHECKED
    if _PACK_CHECKED is None:
        try:
            g = torch.Generator().manual_seed(1)
            x, w, b = (torch.randn(s, generator=g) for s in ((9, 130), (70, 130), (70,)))
            for dt in _DTYPES:
                _check(x.to(dt), w.to(dt), b.to(dt), pack=True)
            _PACK_CHECKED = True
        except Exception as e:
            _PACK_CHECKED = False
            _warn_once("pack", f"fastadapters serving: oneDNN's packed linear weights are unavailable on torch "
                               f"{torch.__version__} ({type(e).__name__}: {e}); the engine's linears run their "
                               "row-major weights (about 1.3-1.9x slower on the CPU at 2-32 rows)")
    return bool(_PACK_CHECKED)


_CHECKED: bool | None = None
_PACK_CHECKED: bool | None = None


def _output_layer(model: nn.Module) -> nn.Module | None:
    from ..patching import _output_head  # (None where the model has none or cannot say)

    return _output_head(model)


def _hookable(model: nn.Module, dtypes) -> list[nn.Linear]:
    out = _output_layer(model)
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype in dtypes
            and m.weight.device.type == "cpu" and "forward" not in m.__dict__ and m is not out]


def packed_bytes(model: nn.Module) -> int:
    """The memory ``install(model, pack=True)`` would add: the packed layers' weights once more."""
    return sum(m.weight.numel() * m.weight.element_size() for m in _hookable(model, _DTYPES))


def install(model: nn.Module, pack: bool = False) -> LinearHooks:
    """``model``'s plain CPU ``nn.Linear`` layers to hook inside ``active()`` (see the module
    docstring): the float32 ones, and with ``pack`` the bfloat16 ones too, each with a packed copy
    of its weight; none where oneDNN's op is missing or wrong (warned once). Changes nothing on the
    model. The model's output layer is hooked but never packed (``lm_head.py`` packs its own)."""
    if not _op_works():
        return LinearHooks([])
    pack = pack and _op_works(pack=True)
    out = _output_layer(model)
    layers = _hookable(model, _DTYPES if pack else (torch.float32,))
    if out is not None and type(out) is nn.Linear and out.weight.dtype == torch.float32 \
            and out.weight.device.type == "cpu" and "forward" not in out.__dict__:
        layers.append(out)
    return LinearHooks([OneDNNForward(m, pack=pack and m is not out) for m in layers])


def available_memory() -> int | None:
    """Bytes of memory the system has available (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 1 << 30 else f"{n / 2**20:.1f} MiB"


def weight_packing(model: nn.Module, requested: bool | None) -> bool:
    """The engine's choice (CPU): ``requested`` when given; by default, pack when the packed copies
    (the linears' and the LM head's weights once more) take at most half the available memory, and
    otherwise warn, saying how much they would take, and run the row-major weights."""
    if requested is not None:
        return bool(requested)
    head = _output_layer(model)
    need = packed_bytes(model)
    if type(head) is nn.Linear and head.weight.dtype in _DTYPES:
        need += head.weight.numel() * head.weight.element_size()
    avail = available_memory()
    if avail is None or need <= avail // 2:
        return True
    warnings.warn(f"fastadapters serving: the engine's linears run their row-major weights: packing them for oneDNN "
                  f"would take {_size(need)} more, over half of the {_size(avail)} available (pack "
                  "them anyway with Engine(pack_weights=True) / serve --weight-packing on; packed, the linears are "
                  "about 1.3-1.9x faster at 2-32 rows on the CPU)", RuntimeWarning, stacklevel=3)
    return False
