"""Adapter configurations: one dataclass per adapter type, JSON round-trippable, validated field by field.

Configs carry everything needed to rebuild an adapter (they are written to ``adapter_config.json``).
``validate()`` names the field, the bad value and what is valid; ``patch`` calls it before touching
the model, so a bad field changes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

ACTIVATIONS = ("tanh", "relu", "gelu", "silu", "swish", "sigmoid")
SERIES_VARIANTS = ("houlsby", "pfeiffer")
INITS = ("bert", "zero_up")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer except the output head

# Every spelling of an adapter type that the API and the command line accept, mapped to
# (config type, fields it implies). The placements of series adapters are adapter names in
# the LLM-Adapters paper (AdapterH, AdapterP), so "houlsby" and "pfeiffer" name them directly.
ADAPTER_SPELLINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "series": ("series", {}),
    "houlsby": ("series", {"variant": "houlsby"}),
    "pfeiffer": ("series", {"variant": "pfeiffer"}),
    "parallel": ("parallel", {}),
    "prefix": ("prefix", {}),
}


def _err(cls_name: str, name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"{cls_name}.{name}: got {value!r}; valid: {valid}")


@dataclass
class AdapterConfig:
    """Fields shared by every adapter type."""

    adapter_type: ClassVar[str] = ""
    # None: the architecture's default (models.py); "all-linear": every linear but the output head;
    # else module-name suffixes, as a list or one comma-separated string. ``patch`` resolves the
    # first two to the names it adapted, so a saved config lists them.
    target_modules: list[str] | str | None = None

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> "AdapterConfig":
        tm = self.target_modules
        if tm is not None:
            valid = (f'None (architecture default), "{ALL_LINEAR}", a non-empty list of module-name suffixes '
                     'or one string of them separated by commas ("q_proj,v_proj")')
            if isinstance(tm, str):  # "q_proj, v_proj" as the command line takes it (not a regex, unlike PEFT)
                tm = [t.strip() for t in tm.split(",")]
            if not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
                raise _err(type(self).__name__, "target_modules", self.target_modules, valid)
            if ALL_LINEAR in tm and len(tm) > 1:
                raise _err(type(self).__name__, "target_modules", self.target_modules,
                           f'"{ALL_LINEAR}" on its own, or a list of names without it')
            self.target_modules = list(tm)
        return self

    def _check_number(self, name: str, lo: float, hi: float, *, integer: bool = False,
                      lo_open: bool = False, hi_open: bool = False) -> None:
        v = getattr(self, name)
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(v)):
            kind = "an integer" if integer else "a finite number"
            raise _err(type(self).__name__, name, v, f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
            raise _err(type(self).__name__, name, v, f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        v = getattr(self, name)
        if v not in choices:
            raise _err(type(self).__name__, name, v, ", ".join(choices))

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adapter_type"] = self.adapter_type
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        d = dict(d)
        kind = d.pop("adapter_type", None)
        target = cls
        if cls is AdapterConfig:
            if kind not in CONFIG_CLASSES:
                raise ValueError(f"adapter_type: got {kind!r}; valid: {', '.join(CONFIG_CLASSES)}")
            target = CONFIG_CLASSES[kind]
        elif kind is not None and kind != cls.adapter_type:
            raise ValueError(f"adapter_type: got {kind!r} for {cls.__name__}; expected {cls.adapter_type!r}")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{target.__name__}: unknown field(s) {unknown}; valid: {sorted(names)}")
        return target(**d).validate()

    @classmethod
    def from_json(cls, s: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(s))


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA exactly as PEFT computes it: y = Wx + b + (alpha/r)·B·A·dropout(x)."""

    adapter_type: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self) -> "LoRAConfig":
        super().validate()
        self._check_number("r", 1, 1 << 16, integer=True)
        self._check_number("alpha", 0, float("inf"), hi_open=True)
        self._check_number("dropout", 0, 1, hi_open=True)
        if not isinstance(self.use_rslora, bool):
            raise _err(type(self).__name__, "use_rslora", self.use_rslora, "True or False")
        return self


@dataclass
class _BottleneckConfig(AdapterConfig):
    """f(z) = U·act(D·dropout(z)), computed in fp32; scaling a float or "learned" (scalar, init 1).

    ``init="bert"`` (the default, as LLM-Adapters) makes the adapter change the model's outputs
    before training; ``init="zero_up"`` starts it as the identity.
    """

    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    scaling: float | str = 1.0
    dropout: float = 0.0
    # "bert" (default): D, U ~ N(0, 0.02), LLM-Adapters' init, kept for faithfulness -- a freshly
    # patched adapter already changes the model's outputs before any training. "zero_up": kaiming D,
    # zero U, so a new adapter is the identity (as a new LoRA adapter is).
    init: str = "bert"

    def validate(self) -> "_BottleneckConfig":
        super().validate()
        self._check_number("bottleneck_size", 1, 1 << 16, integer=True)
        self._check_choice("non_linearity", ACTIVATIONS)
        if self.scaling != "learned":
            if isinstance(self.scaling, str):
                raise _err(type(self).__name__, "scaling", self.scaling, 'a finite number or "learned"')
            self._check_number("scaling", -float("inf"), float("inf"), lo_open=True, hi_open=True)
        self._check_number("dropout", 0, 1, hi_open=True)
        self._check_choice("init", INITS)
        return self


@dataclass
class SeriesConfig(_BottleneckConfig):
    """Series adapters: "houlsby" (AdapterH: mh_adapter on FFN inputs + output_adapter on the FFN
    output) or "pfeiffer" (AdapterP: output_adapter on the FFN output only)."""

    adapter_type: ClassVar[str] = "series"
    variant: str = "houlsby"

    def validate(self) -> "SeriesConfig":
        super().validate()
        self._check_choice("variant", SERIES_VARIANTS)
        return self


@dataclass
class ParallelConfig(_BottleneckConfig):
    """Parallel adapter: y = Wx + b + s·f(x) on each target linear."""

    adapter_type: ClassVar[str] = "parallel"


@dataclass
class PrefixConfig(AdapterConfig):
    """Prefix-tuning: learned per-layer key/value prefixes of ``num_virtual_tokens`` positions.

    With ``prefix_projection`` the prefixes come from an MLP (token_dim -> encoder_hidden_size ->
    layers*2*kv_dim) over a learned embedding, as in Li & Liang; otherwise the embedding is the prefix.
    ``target_modules`` is not used by prefix-tuning (it acts on every attention layer).
    """

    adapter_type: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 30
    prefix_projection: bool = False
    encoder_hidden_size: int = 512

    def validate(self) -> "PrefixConfig":
        super().validate()
        if self.target_modules is not None:
            raise _err(type(self).__name__, "target_modules", self.target_modules,
                       "None (prefix-tuning acts on every attention layer)")
        self._check_number("num_virtual_tokens", 1, 1 << 16, integer=True)
        self._check_number("encoder_hidden_size", 1, 1 << 20, integer=True)
        if not isinstance(self.prefix_projection, bool):
            raise _err(type(self).__name__, "prefix_projection", self.prefix_projection, "True or False")
        return self


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    "lora": LoRAConfig,
    "series": SeriesConfig,
    "parallel": ParallelConfig,
    "prefix": PrefixConfig,
}


def make_config(adapter: str, **fields: Any) -> AdapterConfig:
    """Build and validate the config for ``adapter`` from keyword fields (what ``fa.patch`` takes).

    ``adapter`` is any of ``ADAPTER_SPELLINGS``: "houlsby" and "pfeiffer" are series adapters with
    that variant (a ``variant`` field that says otherwise is an error).
    """
    if adapter not in ADAPTER_SPELLINGS:
        raise ValueError(f"adapter: got {adapter!r}; valid: {', '.join(ADAPTER_SPELLINGS)}")
    kind, implied = ADAPTER_SPELLINGS[adapter]
    for key, value in implied.items():
        if key in fields and fields[key] != value:
            raise ValueError(f"adapter={adapter!r} means {key}={value!r}; got {key}={fields[key]!r} "
                             f"(use adapter={kind!r} with {key}={fields[key]!r}, or drop {key})")
    fields = {**fields, **implied}
    cls = CONFIG_CLASSES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid: {sorted(names)}")
    return cls(**fields).validate()
