"""Modules that wrap a frozen base linear and run adapters through the ops layer.

``AdapterLinear`` holds one frozen base module (``nn.Linear`` or transformers' ``Conv1D``) and any
number of named adapters of any type beside it, because a model can carry a LoRA adapter and a
parallel adapter on the same projection. Parameter names follow the files users already have:
``lora_A.<name>.weight`` (r, in) / ``lora_B.<name>.weight`` (out, r) as PEFT, and
``adapter_down.<name>.weight`` (b, d) / ``adapter_up.<name>.weight`` (d, b) /
``adapter_scaling.<name>`` as the LLM-Adapters fork. Adapter weights are kept in fp32 whatever the
base dtype (PEFT's autocast_adapter_dtype behaviour; LLM-Adapters computes its branch in fp32).

Only the active adapter runs; ``routing`` (set by the multi-adapter router) overrides it per row.
Where the backend is plain torch (the CPU default) ``forward`` calls the torch implementation
straight (``_forward_direct``), skipping the per-call lookups, checks and dispatch that cost more
than the GEMMs when decoding a few rows; the arithmetic, and so every result, is the same.
``PrefixEncoder`` produces prefix-tuning key/value prefixes for every layer.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import AdapterConfig, LoRAConfig, PrefixConfig, _BottleneckConfig
from .ops.bottleneck import ACT_IDS, bottleneck_linear, bottleneck_linear_torch
from .ops.dispatch import _warn_once as warn_once, plain_torch, resolve as resolve_backend
from .ops.lora import OP as LORA_OP, branch_group, branch_group_unsupported, lora_linear, lora_linear_torch

try:  # transformers' GPT-2 style linear (weight stored (in, out))
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always ships it
    Conv1D = ()

SUPPORTED_BASES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


@dataclass
class AdapterSpec:
    """What one named adapter does on one linear."""

    kind: str  # "lora" | "mh" | "output" | "parallel"
    config: AdapterConfig
    scaling: float | None  # None: learned (adapter_scaling parameter)


def fusable(base: nn.Module) -> bool:
    """Whether the kernels may read ``base.weight`` / ``base.bias`` in place of calling ``base``:
    true for nn.Linear and Conv1D and subclasses that keep their forward; false for a subclass
    with its own forward (bitsandbytes' 4/8-bit linears, fake-quantised or otherwise custom
    layers), whose weight is not what its forward multiplies by."""
    own = type(base).forward
    return own is nn.Linear.forward or (isinstance(Conv1D, type) and own is Conv1D.forward)



def base_weight_nk(base: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) matrix: a transposed view for Conv1D, no copy."""
    return base.weight.t() if (Conv1D and isinstance(base, Conv1D)) else base.weight


def base_features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):  # its attributes, not the weight's shape (packed in quantised subclasses)
        return int(base.in_features), int(base.out_features)
    w = base_weight_nk(base)
    return int(w.shape[1]), int(w.shape[0])


class AdapterLinear(nn.Module):
    """A frozen base linear plus named adapters (see the module docstring)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_BASES):
            raise TypeError(f"AdapterLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_features(base_layer)
        self.fusable = fusable(base_layer)
        name = type(base_layer).__name__
        if not self.fusable:
            warn_once("adapter_linear", name, f"fastadapters: {name} has its own forward (a quantised or custom "
                      "linear), so the fused kernels cannot read its weight: its adapters run beside "
                      "base_layer(x) with the plain torch ops (slower, same results)")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_scaling = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.backend: str | None = None
        self.routing = None  # set per forward by fastadapters.serving routing

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as stored (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -- building ----------------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, kind: str, generator: torch.Generator | None = None):
        dev = self.base_layer.weight.device
        k, n = self.in_features, self.out_features
        if isinstance(config, LoRAConfig):
            A = nn.Linear(k, config.r, bias=False, device=dev, dtype=torch.float32)
            B = nn.Linear(config.r, n, bias=False, device=dev, dtype=torch.float32)
            with torch.no_grad():  # PEFT's init: A kaiming-uniform(a=sqrt(5)), B zero
                bound = 1.0 / math.sqrt(k)  # kaiming_uniform with a=sqrt(5) on fan_in k
                A.weight.uniform_(-bound, bound, generator=generator)
                B.weight.zero_()
            self.lora_A[name], self.lora_B[name] = A, B
            self.specs[name] = AdapterSpec("lora", config, config.scaling)
            return
        assert isinstance(config, _BottleneckConfig)
        d_in = n if kind == "output" else k
        d_out = k if kind == "mh" else n
        b = config.bottleneck_size
        D = nn.Linear(d_in, b, bias=False, device=dev, dtype=torch.float32)
        U = nn.Linear(b, d_out, bias=False, device=dev, dtype=torch.float32)
        with torch.no_grad():
            if config.init == "bert":
                D.weight.normal_(0.0, 0.02, generator=generator)
                U.weight.normal_(0.0, 0.02, generator=generator)
            else:  # zero_up: the adapter starts as the identity
                bound = 1.0 / math.sqrt(d_in)
                D.weight.uniform_(-bound, bound, generator=generator)
                U.weight.zero_()
        self.adapter_down[name], self.adapter_up[name] = D, U
        learned = config.scaling == "learned"
        if learned:
            self.adapter_scaling[name] = nn.Parameter(torch.ones((), device=dev, dtype=torch.float32))
        self.specs[name] = AdapterSpec(kind, config, None if learned else float(config.scaling))

    def delete_adapter(self, name: str) -> None:
        for container in (self.lora_A, self.lora_B, self.adapter_down, self.adapter_up, self.adapter_scaling):
            if name in container:
                del container[name]
        self.specs.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None

    def adapter_parameters(self, name: str):
        for container in (self.lora_A, self.lora_B, self.adapter_down, self.adapter_up):
            if name in container:
                yield from container[name].parameters()
        if name in self.adapter_scaling:
            yield self.adapter_scaling[name]

    def scaling_of(self, name: str):
        spec = self.specs[name]
        return self.adapter_scaling[name] if spec.scaling is None else spec.scaling

    # -- compute -----------------------------------------------------------------------------
    def _base_args(self):
        return base_weight_nk(self.base_layer), self.base_layer.bias

    def _forward_unfused(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """An opaque base layer (see ``fusable``): base_layer(x) plus the adapter, plain torch."""
        spec = self.specs[name]
        cfg = spec.config
        if spec.kind == "lora":
            y = self.base_layer(x)
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            with torch.autocast(x.device.type, enabled=False):  # the branch in the adapter dtype, as
                xd = x if x.dtype == A.dtype else x.to(A.dtype)  # the fused paths run it
                if self.training and cfg.dropout > 0:
                    xd = torch.nn.functional.dropout(xd, cfg.dropout, True)
                branch = spec.scaling * ((xd @ A.t()) @ B.t())
            return y + branch.to(y.dtype)
        return bottleneck_linear(spec.kind, x, self.base_layer, self.adapter_down[name].weight,
                                 self.adapter_up[name].weight, self.scaling_of(name), cfg.non_linearity,
                                 cfg.dropout, self.training, "torch")

    def forward_adapter(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not self.fusable:
            return self._forward_unfused(x, name)
        spec = self.specs[name]
        weight, bias = self._base_args()
        if spec.kind == "lora":
            cfg = spec.config
            return lora_linear(x, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                               spec.scaling, cfg.dropout, self.training, self.backend)
        cfg = spec.config
        return bottleneck_linear(spec.kind, x, (weight, bias), self.adapter_down[name].weight,
                                 self.adapter_up[name].weight, self.scaling_of(name), cfg.non_linearity,
                                 cfg.dropout, self.training, self.backend)

    def _forward_direct(self, x: torch.Tensor, name: str, spec: AdapterSpec) -> torch.Tensor | None:
        """The torch backend's implementation called straight, or None to take ``forward_adapter``.

        Where the backend resolves to plain torch (the CPU default), what ``forward_adapter`` does
        per call besides the arithmetic -- ModuleDict and parameter lookups through
        ``nn.Module.__getattr__``, the ops' shape checks, backend resolution and dispatch -- costs
        more than the GEMMs when M is a few rows (decoding). Here the weights come from the
        modules' dicts, the weights' shapes are the ones ``add_adapter`` built (x's is checked),
        and the arithmetic is the very function the dispatcher would call, so the results are the
        same bits. Anything unusual (a wrong x, another backend, grouped outputs waiting in a
        ``SharedInput``) returns None and takes the full path, which checks and says why."""
        if x.shape[-1] != self.in_features or not plain_torch(self.backend, x.is_cuda):
            return None
        share = self.__dict__.get("shared_input")
        if share is not None and share._pending:
            return None
        mods = self._modules
        base = mods["base_layer"]
        params = base._parameters
        weight = params.get("weight")
        if weight is None:
            return None
        bias = params["bias"] if "bias" in params else base.bias
        if isinstance(base, Conv1D):
            weight = weight.t()  # stored (in, out): the (out, in) view, as base_weight_nk
        cfg = spec.config
        if spec.kind == "lora":
            A = mods["lora_A"]._modules[name]._parameters["weight"]
            B = mods["lora_B"]._modules[name]._parameters["weight"]
            return lora_linear_torch(x, weight, bias, A, B, float(spec.scaling), float(cfg.dropout), self.training)
        down = mods["adapter_down"]._modules[name]._parameters["weight"]
        up = mods["adapter_up"]._modules[name]._parameters["weight"]
        scaling = spec.scaling if spec.scaling is not None else self.adapter_scaling[name]
        return bottleneck_linear_torch(spec.kind, x, (weight, bias), down, up, scaling, cfg.non_linearity,
                                       float(cfg.dropout), self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return self.routing.forward(self, x)
        name = self.active_adapter
        spec = self.specs.get(name) if name is not None else None
        if spec is None:
            return self.base_layer(x)
        if self.fusable and not torch.compiler.is_compiling():
            out = self._forward_direct(x, name, spec)
            if out is not None:
                return out
        share = self.__dict__.get("shared_input")
        if share is not None and self.fusable:
            out = share.output(self, x, name)
            if out is not None:
                return out
        return self.forward_adapter(x, name)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}:{s.kind}" for n, s in self.specs.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{kinds}], active={self.active_adapter}"


def _version_of(t: torch.Tensor) -> int | None:
    """The version counter, None for an inference tensor (torch.inference_mode keeps none; there
    the same object is taken to be the same input)."""
    return None if t.is_inference() else t._version


class SharedInput:
    """Sibling AdapterLinears that the model calls one after another on the same tensor (q, k, v;
    gate, up: ``models.Architecture.shared_input``). When the first of them is called and every
    member runs the same LoRA or parallel adapter on the triton backend, all members' outputs are
    computed in one ``lora_linear_group`` / ``parallel_linear_group`` (X read once); the others'
    outputs wait here and are handed out when
    those members are called with that very tensor, unmodified (same object, same version; under
    torch.inference_mode, which keeps no versions, the same object).
    Anything else -- another input, a member called out of turn, a pre-hook that changed the input,
    torch.compile tracing -- runs the member on its own (the same results; with dropout, that
    member's mask then comes from a later seed), and the waiting siblings still get theirs.

    Held in each member's ``__dict__`` (not a submodule); ``patching`` rebuilds the links whenever
    the set of wrappers changes.
    """

    def __init__(self, members: list["AdapterLinear"]):
        self.members = members
        self._x: torch.Tensor | None = None
        self._version = -1
        self._pending: dict[int, torch.Tensor] = {}

    def _group_call(self, name: str, x: torch.Tensor):
        """Every member's output for adapter ``name`` from one group call, else None."""
        first = self.members[0]
        spec0 = first.specs.get(name)
        if spec0 is None or spec0.kind not in ("lora", "parallel"):
            return None
        cfg0 = spec0.config
        ws, bs, downs, ups, ss = [], [], [], [], []
        for m in self.members:
            spec = m.specs.get(name)
            if (m.active_adapter != name or m.routing is not None or spec is None or spec.kind != spec0.kind
                    or not m.fusable or m.training != first.training or m.backend != first.backend
                    or spec.config.dropout != cfg0.dropout
                    or getattr(spec.config, "non_linearity", None) != getattr(cfg0, "non_linearity", None)):
                return None
            w, b = m._base_args()
            ws.append(w)
            bs.append(b)
            if spec.kind == "lora":
                downs.append(m.lora_A[name].weight)
                ups.append(m.lora_B[name].weight)
            else:
                downs.append(m.adapter_down[name].weight)
                ups.append(m.adapter_up[name].weight)
            ss.append(m.scaling_of(name))
        op = LORA_OP if spec0.kind == "lora" else "bottleneck_parallel"
        if branch_group_unsupported(op, x, [d.shape[0] for d in downs], first.backend) is not None:
            return None
        act = 0 if spec0.kind == "lora" else ACT_IDS[cfg0.non_linearity]
        return branch_group(x, ws, bs, downs, ups, ss, act, cfg0.dropout, first.training)

    def output(self, layer: "AdapterLinear", x: torch.Tensor, name: str) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or os.environ.get("FASTADAPTERS_SHARED_INPUT") == "0":
            return None  # (FASTADAPTERS_SHARED_INPUT=0: every projection on its own, e.g. to compare)
        if self._pending:
            if self._x is x and self._version == _version_of(x) and id(layer) in self._pending:
                out = self._pending.pop(id(layer))
                if not self._pending:
                    self._x = None
                return out
            # called with another input (a pre-hook, another call) while siblings wait: this member
            # runs alone, the others still get their outputs; no second group
            self._pending.pop(id(layer), None)
            if not self._pending:
                self._x = None
            return None
        kind = layer.specs[name].kind
        if kind not in ("lora", "parallel"):
            return None
        try:
            op = LORA_OP if kind == "lora" else "bottleneck_parallel"
            if resolve_backend(op, layer.backend, x.device) != "triton":
                return None  # the torch path gains nothing from grouping: cheap early exit
        except RuntimeError:
            return None  # an unusable backend request: the member's own call says why
        if not any(m is layer for m in self.members):
            return None  # a replica sharing our __dict__ (nn.DataParallel): its own weights, alone
        outs = self._group_call(name, x)
        if outs is None:
            return None
        mine = None
        for m, out in zip(self.members, outs):
            if m is layer:
                mine = out
            else:
                self._pending[id(m)] = out
        self._x, self._version = (x, _version_of(x)) if self._pending else (None, -1)
        return mine

    def __deepcopy__(self, memo):
        # outputs waiting for their member are not state: a copy starts with none (they are
        # non-leaf tensors, which deepcopy refuses)
        import copy

        return SharedInput([copy.deepcopy(m, memo) for m in self.members])

    def __getstate__(self):
        return {"members": self.members, "_x": None, "_version": -1, "_pending": {}}


class PrefixEncoder(nn.Module):
    """Learned prefixes for every layer: ``forward(batch)`` gives per-layer (key, value) pairs,
    each (batch, kv_heads, num_virtual_tokens, head_dim).

    The flat layout of ``embedding.weight`` (P, layers*2*kv_heads*head_dim) is PEFT's
    ``prompt_embeddings`` layout: per token, layer-major, key before value, then heads, then dims.
    """

    def __init__(self, config: PrefixConfig, num_layers: int, kv_heads: int, head_dim: int,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.config = config
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        p = config.num_virtual_tokens
        flat = num_layers * 2 * kv_heads * head_dim
        if config.prefix_projection:
            token_dim = kv_heads * head_dim
            self.embedding = nn.Embedding(p, token_dim, device=device, dtype=dtype)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, config.encoder_hidden_size, device=device, dtype=dtype),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, flat, device=device, dtype=dtype),
            )
        else:
            self.embedding = nn.Embedding(p, flat, device=device, dtype=dtype)
            self.transform = None

    def forward(self, batch: int, dtype: torch.dtype):
        w = self.embedding.weight
        if self.transform is not None:
            w = self.transform(w)
        p = w.shape[0]
        kv = w.to(dtype).view(p, self.num_layers * 2, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (layers*2, heads, P, head_dim)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]
