"""Adapter files: save and load adapters as ``adapter_model.safetensors`` + ``adapter_config.json``.

Three on-disk formats are understood:

* **fastadapters** (ours, every adapter type). Keys are the in-model parameter names with the adapter
  name taken out: ``<path>.lora_A.weight`` (r, in), ``<path>.lora_B.weight`` (out, r),
  ``<path>.adapter_down.weight`` (b, d), ``<path>.adapter_up.weight`` (d, b), ``<path>.adapter_scaling``
  (a scalar, when learned) and ``prefix_encoder.<param>`` for prefix-tuning. The JSON is the config's
  ``to_dict()`` plus ``"format": "fastadapters"``, ``"format_version"`` and ``"modules"``
  ({module path: placement}).
* **PEFT LoRA** (both ways): keys ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` and an
  ``adapter_config.json`` with ``peft_type: "LORA"`` as PEFT writes it, so that
  ``peft.PeftModel.from_pretrained`` reads our export and we read PEFT's ``save_pretrained``.
* **PEFT prefix-tuning** (both ways): one tensor ``prompt_embeddings`` (P, layers*2*kv_heads*head_dim)
  and ``peft_type: "PREFIX_TUNING"``. PEFT stores the prefix itself, after any projection MLP, so a
  file written from a ``prefix_projection=True`` adapter holds the projected prefixes and loads as
  a plain (``prefix_projection=False``) prefix adapter, as PEFT itself loads it for inference.
* **LLM-Adapters checkpoints** (load only): ``adapter_model.bin`` (read with
  ``torch.load(weights_only=True)``) with keys ``base_model.model.<path>.adapter_down.weight`` /
  ``adapter_up.weight`` / ``adapter_scaling`` and the fork's ``peft_type: "BOTTLENECK"`` config
  (``use_parallel_adapter`` -> ParallelConfig, ``use_adapterp`` -> SeriesConfig pfeiffer, otherwise
  SeriesConfig houlsby). The fork's LoRA checkpoints are PEFT LoRA files in ``.bin`` form.

In a distributed run (DDP, FSDP2) global rank 0 writes; a sharded model's adapter is gathered whole
first (``fastadapters.distributed``), so the file equals the one an unsharded run writes. Writes are
atomic per file: each file is serialised in memory, written to a temporary name in the
target directory, fsync'ed and renamed over the old one, so a failure never leaves a half-written
file. Loads check everything (keys, shapes, dtypes, missing weights, the config) before the model
changes; on any error the model is left exactly as it was.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from typing import Any

import torch
import torch.nn as nn

from . import __version__, distributed, models
from . import patching
from .config import (AdapterConfig, LoRAConfig, ParallelConfig, PrefixConfig, SeriesConfig,
                     _BottleneckConfig)
from .layers import SUPPORTED_BASES, AdapterLinear, PrefixEncoder, base_features

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
FORMAT = "fastadapters"
FORMAT_VERSION = 1
FORMATS = ("fastadapters", "peft")
PEFT_PREFIX = "base_model.model."
PREFIX_KEY = "prefix_encoder"
PEFT_PROMPT_KEY = "prompt_embeddings"
_CONTAINERS = ("lora_A", "lora_B", "adapter_down", "adapter_up")
_META_KEYS = ("format", "format_version", "modules", "fastadapters_version", "base_model_name_or_path", "save_id")

__all__ = ["save_adapter", "load_adapter", "read_adapter"]


# ---------------------------------------------------------------------------------------------
# parameter names
# ---------------------------------------------------------------------------------------------

def _wrapper_entries(wrapper: AdapterLinear, path: str, name: str):
    """(file key, parameter) for adapter ``name`` on one AdapterLinear; keys without the name."""
    for cont in _CONTAINERS:
        container = getattr(wrapper, cont)
        if name in container:
            for pname, p in container[name].named_parameters():
                yield f"{path}.{cont}.{pname}", p
    if name in wrapper.adapter_scaling:
        yield f"{path}.adapter_scaling", wrapper.adapter_scaling[name]


def _adapter_entries(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{file key: live parameter} for adapter ``name`` of a patched model."""
    st = patching._require_state(model)
    out: dict[str, torch.Tensor] = {}
    for path in st.kinds[name]:
        wrapper = model.get_submodule(path)
        out.update(_wrapper_entries(wrapper, path, name))
    enc = patching._prefix_encoders(model)
    if enc is not None and name in enc:
        for pname, p in enc[name].named_parameters():
            out[f"{PREFIX_KEY}.{pname}"] = p
    return out


def _expected_shapes(model: nn.Module, cfg: AdapterConfig, kinds: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """{file key: shape} that adapter ``cfg`` with placements ``kinds`` has on ``model``.

    Computed on the meta device with the real layer classes, so nothing is allocated, no random
    numbers are drawn and the model is not touched.
    """
    out: dict[str, tuple[int, ...]] = {}
    if isinstance(cfg, PrefixConfig):
        layers, kv_heads, head_dim = models.attention_geometry(model.config)
        enc = PrefixEncoder(cfg, layers, kv_heads, head_dim, device="meta")
        for pname, p in enc.named_parameters():
            out[f"{PREFIX_KEY}.{pname}"] = tuple(p.shape)
        return out
    for path, kind in kinds.items():
        mod = model.get_submodule(path)
        k, n = (mod.in_features, mod.out_features) if isinstance(mod, AdapterLinear) else base_features(mod)
        probe = AdapterLinear(nn.Linear(k, n, bias=False, device="meta"))
        probe.add_adapter("probe", cfg, kind)
        for key, p in _wrapper_entries(probe, path, "probe"):
            out[key] = tuple(p.shape)
    return out


def _module_of_key(key: str) -> str:
    """Module path a file key belongs to (``a.b.q_proj.lora_A.weight`` -> ``a.b.q_proj``)."""
    if key.startswith(PREFIX_KEY + "."):
        return PREFIX_KEY
    if key.endswith(".adapter_scaling"):
        return key[: -len(".adapter_scaling")]
    for cont in _CONTAINERS:
        marker = f".{cont}."
        if marker in key:
            return key[: key.rindex(marker)]
    return ""


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_atomic(directory: str, files: dict[str, bytes]) -> None:
    """Write each ``{file name: bytes}`` to a temporary name, fsync, then rename over the target."""
    temps: dict[str, str] = {}
    try:
        for fname, data in files.items():
            tmp = os.path.join(directory, f".{fname}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            temps[fname] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for fname, tmp in temps.items():
            os.replace(tmp, os.path.join(directory, fname))
        temps = {}
        _fsync_dir(directory)
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass


EMBEDDED_CONFIG_KEY = "adapter_config"


def _serialize(tensors: dict[str, torch.Tensor], config: bytes | None = None) -> bytes:
    """safetensors bytes; ``config`` (the adapter_config.json bytes) rides in the header too, so
    the weights file alone says which config it belongs to (see ``_embedded_config``)."""
    import safetensors.torch

    meta = {"format": "pt"}
    if config is not None:
        meta[EMBEDDED_CONFIG_KEY] = config.decode("utf-8")
    return safetensors.torch.save(tensors, metadata=meta)


def _embedded_config(path: str) -> dict[str, Any] | None:
    """The config a fastadapters-written weights file carries in its header, or None."""
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        return None
    try:
        import safetensors

        with safetensors.safe_open(file, framework="pt") as f:
            text = (f.metadata() or {}).get(EMBEDDED_CONFIG_KEY)
        return None if text is None else json.loads(text)
    except Exception:  # unreadable weights are reported by the weights reader, with the file named
        return None


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

def _peft_config_dict(model: nn.Module, cfg: LoRAConfig, kinds: dict[str, str], name_or_path) -> dict[str, Any]:
    targets = cfg.target_modules or models.default_targets(model, "lora")
    # check that PEFT's suffix matching of these targets picks exactly our modules; else name them in full
    candidates = [p for p, m in patching._linear_modules(model).items()
                  if p and isinstance(m, SUPPORTED_BASES + (AdapterLinear,))]
    if {p for p in candidates if models.matches(p, targets)} != set(kinds):
        targets = sorted(kinds)
    conv1d = any(not isinstance(model.get_submodule(p).base_layer, nn.Linear) for p in kinds)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": cfg.alpha,
        "lora_bias": False,
        "lora_dropout": cfg.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": cfg.use_rslora,
    }


def _flat_prefix(encoder: PrefixEncoder, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prefixes as PEFT stores them: (P, layers*2*kv_heads*head_dim), after any projection, fp32.
    ``params``: the encoder's whole parameters by name (gathered when the model is sharded)."""
    with torch.no_grad():
        w = params["embedding.weight"]
        if encoder.transform is not None:
            inner = {n[len("transform."):]: t for n, t in params.items() if n.startswith("transform.")}
            w = torch.func.functional_call(encoder.transform, inner, (w,))
        return w.detach().to("cpu", torch.float32).contiguous()


def _peft_prefix_config_dict(model: nn.Module, cfg: PrefixConfig, name_or_path) -> dict[str, Any]:
    layers, kv_heads, head_dim = models.attention_geometry(model.config)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": name_or_path,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": kv_heads,
        "num_layers": layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": cfg.prefix_projection,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": kv_heads * head_dim,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 format: str = "fastadapters") -> str:
    """Write adapter ``name`` (default: the active one) of ``model`` to directory ``path``.

    ``format="fastadapters"`` keeps every adapter type; ``format="peft"`` writes LoRA and
    prefix-tuning adapters so that ``peft.PeftModel.from_pretrained(base, path)`` loads them. Both files are written
    atomically (temporary file, fsync, rename). Returns ``path`` as a string.

    In a distributed run only global rank 0 writes. A model sharded with FSDP2 is saved whole: every
    rank must call ``save_adapter`` (the adapter tensors are gathered), and all return once the files exist
    (or all raise, if rank 0 could not write them).
    """
    if format not in FORMATS:
        raise ValueError(f"format: got {format!r}; valid: {', '.join(FORMATS)}")
    st = patching._require_state(model)
    if name is None:
        name = st.active
        if name is None:
            raise ValueError(f"no adapter is active; pass name=... (loaded: {list(st.configs)})")
    cfg = patching.get_config(model, name)
    kinds = dict(st.kinds[name])
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None

    entries = _adapter_entries(model, name)
    # a sharded model's adapter tensors are gathered whole (a collective: every rank is here)
    sharded = distributed.sharding_of(model) is not None
    tensors = {k: distributed.full_tensor(p.detach()).to("cpu").contiguous() for k, p in entries.items()}
    # a learned scaling is a scalar on disk (shard_model made it a 1-element vector)
    tensors = {k: t.reshape(()) if k.endswith(".adapter_scaling") else t for k, t in tensors.items()}
    if format == "peft" and isinstance(cfg, PrefixConfig):
        enc_params = {k[len(PREFIX_KEY) + 1:]: t for k, t in tensors.items() if k.startswith(PREFIX_KEY + ".")}
        tensors = {PEFT_PROMPT_KEY: _flat_prefix(patching._prefix_encoders(model)[name], enc_params)}
        meta = _peft_prefix_config_dict(model, cfg, name_or_path)
    elif format == "peft":
        if not isinstance(cfg, LoRAConfig):
            raise ValueError(f"format='peft' supports LoRA and prefix-tuning adapters; adapter {name!r} is "
                             f"{cfg.adapter_type!r}: save it with format='fastadapters'")
        tensors = {PEFT_PREFIX + k: t for k, t in tensors.items()}
        meta = _peft_config_dict(model, cfg, kinds, name_or_path)
    else:
        meta = cfg.to_dict()
        meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "fastadapters_version": __version__,
                     "base_model_name_or_path": name_or_path, "modules": kinds,
                     "save_id": secrets.token_hex(8)})

    # serialise both files before touching the directory: a failure here leaves it as it was.
    # Our format: the weights are renamed into place first and carry their config (with a fresh
    # save_id) in the header, so a crash between the two renames leaves new weights whose own
    # config read_adapter trusts. PEFT files stay exactly as PEFT writes them.
    path = os.fspath(path)

    def write() -> None:
        config = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
        weights = _serialize(tensors, config if format == FORMAT else None)
        os.makedirs(path, exist_ok=True)
        _write_atomic(path, {WEIGHTS_NAME: weights, CONFIG_NAME: config})

    # in a distributed run the files are written once, by global rank 0; after a sharded save (every
    # rank called) none returns before they exist, and a failure on rank 0 raises on every rank
    distributed.write_on_rank0(write, every_rank=sharded)
    return path


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------

def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    with open(file, "rb") as f:
        data = f.read()
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # SafetensorError and friends: say which file, not where inside safetensors
        raise ValueError(f"{file}: not a valid safetensors file, corrupt or truncated ({len(data)} bytes; "
                         f"{type(e).__name__}: {e})") from None


def _read_bin(file: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: could not be read as a PyTorch checkpoint with weights_only=True "
                         f"(corrupt, truncated or not a plain state dict: {type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ValueError(f"{file}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)


def _read_weights(path: str) -> tuple[str, dict[str, torch.Tensor]]:
    st_file, bin_file = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_BIN_NAME)
    if os.path.isfile(st_file):
        return st_file, _read_safetensors(st_file)
    if os.path.isfile(bin_file):
        return bin_file, _read_bin(bin_file)
    raise ValueError(f"{path}: no adapter weights ({WEIGHTS_NAME} or {WEIGHTS_BIN_NAME})")


# ---------------------------------------------------------------------------------------------
# format translation: every format -> (config, placements or None, {our key: tensor})
# ---------------------------------------------------------------------------------------------

def _strip_peft_keys(file: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in tensors.items():
        if not k.startswith(PEFT_PREFIX):
            raise ValueError(f"{file}: key {k!r} does not start with {PEFT_PREFIX!r} (not a PEFT adapter file)")
        out[k[len(PEFT_PREFIX):]] = t
    return out


def _unsupported(file: str, d: dict, checks: dict[str, Any]) -> None:
    """Raise when a field of a PEFT-style config asks for something we do not implement."""
    for fld, ok in checks.items():
        if fld in d and not ok(d[fld]):
            raise ValueError(f"{file}: {fld}={d[fld]!r} is not supported by fastadapters")


def _empty(v) -> bool:
    return v in (None, False, {}, [], "none")


def _from_peft_lora(file: str, d: dict) -> LoRAConfig:
    _unsupported(file, d, {
        "bias": lambda v: v in (None, "none"),
        "use_dora": _empty, "rank_pattern": _empty, "alpha_pattern": _empty,
        "modules_to_save": _empty, "layer_replication": _empty, "lora_bias": _empty,
        "target_parameters": _empty, "trainable_token_indices": _empty,
        "enable_lora": _empty,  # LLM-Adapters' merged-qkv LoRA
        # PEFT LoRA variants whose forward is not plain LoRA (weights may still have LoRA shapes)
        "alora_invocation_tokens": _empty, "arrow_config": _empty, "use_bdlora": _empty,
        "kasa_config": _empty, "monteclora_config": _empty, "use_qalora": _empty,
    })
    try:
        tm = d.get("target_modules")
        return LoRAConfig(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                          use_rslora=bool(d.get("use_rslora", False)),
                          target_modules=list(tm) if isinstance(tm, (list, tuple)) else None).validate()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def _from_peft_prefix(file: str, d: dict, tensors: dict[str, torch.Tensor]):
    """PEFT PREFIX_TUNING -> a plain PrefixConfig and ``prefix_encoder.embedding.weight``."""
    _unsupported(file, d, {"num_transformer_submodules": lambda v: v in (None, 1),
                           "task_type": lambda v: v in (None, "CAUSAL_LM"), "modules_to_save": _empty})
    if set(tensors) != {PEFT_PROMPT_KEY}:
        raise ValueError(f"{file}: a PEFT prefix-tuning file holds one tensor {PEFT_PROMPT_KEY!r}, "
                         f"got keys {sorted(tensors)[:5]}")
    try:
        cfg = PrefixConfig(num_virtual_tokens=d.get("num_virtual_tokens", 0), prefix_projection=False).validate()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None
    return cfg, {f"{PREFIX_KEY}.embedding.weight": tensors[PEFT_PROMPT_KEY]}


def _check_peft_prefix_geometry(model: nn.Module, cfg_file: str) -> None:
    """A PEFT prefix file's declared layers / kv heads / head size against the model's attention."""
    d = _read_json(cfg_file)
    if not hasattr(model, "config"):
        raise ValueError("prefix-tuning needs a transformers model (with .config)")
    layers, kv_heads, head_dim = models.attention_geometry(model.config)
    want = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    bad = [f"{k}={d.get(k)!r} (this model: {v})" for k, v in want.items() if d.get(k) != v]
    if bad:
        raise ValueError(f"{cfg_file}: the prefixes were made for another attention geometry: {', '.join(bad)}")


def _from_llm_adapters(file: str, d: dict) -> _BottleneckConfig:
    _unsupported(file, d, {"bias": lambda v: v in (None, "none"), "modules_to_save": _empty})
    init = {"bert": "bert", "mam_adapter": "zero_up", None: "bert"}.get(d.get("init_weights"), "bert")
    tm = d.get("target_modules")
    fields = dict(bottleneck_size=d.get("bottleneck_size", 256), non_linearity=d.get("non_linearity", "tanh"),
                  dropout=d.get("adapter_dropout", 0.0), scaling=d.get("scaling", 1.0), init=init,
                  target_modules=list(tm) if isinstance(tm, (list, tuple)) else None)
    try:
        if d.get("use_parallel_adapter"):
            return ParallelConfig(**fields).validate()
        variant = "pfeiffer" if d.get("use_adapterp") else "houlsby"
        return SeriesConfig(variant=variant, **fields).validate()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from None


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, str] | None, dict[str, torch.Tensor], str]:
    """Read an adapter directory in any supported format.

    Returns (config, placements {module path: kind} or None when the file does not record them,
    {fastadapters key: tensor}, format name). Raises ValueError naming the file on any problem.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{path}: no {CONFIG_NAME}")
    d = _read_json(cfg_file)
    if d.get("format") == FORMAT:
        # a save_id that differs from the weights' own means a save was torn between its renames
        # (a hand edit of the JSON keeps the id, and is respected)
        embedded = _embedded_config(path)
        if embedded is not None and embedded.get("save_id") != d.get("save_id"):
            warnings.warn(f"{cfg_file} belongs to another save than {WEIGHTS_NAME} (a save was interrupted "
                          "between its two renames); using the config recorded in the weights file", RuntimeWarning)
            d = embedded
    if d.get("format") == FORMAT:
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{cfg_file}: format_version {version!r} is not supported "
                             f"(this fastadapters reads up to {FORMAT_VERSION})")
        kinds = d.get("modules") or {}
        if not isinstance(kinds, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()):
            raise ValueError(f"{cfg_file}: 'modules' must map module paths to placements, got {kinds!r}")
        body = {k: v for k, v in d.items() if k not in _META_KEYS}
        try:
            cfg = AdapterConfig.from_dict(body)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        wfile, tensors = _read_weights(path)
        return cfg, (None if isinstance(cfg, PrefixConfig) else dict(kinds)), tensors, FORMAT
    peft_type = d.get("peft_type")
    if peft_type == "LORA":
        cfg = _from_peft_lora(cfg_file, d)
        wfile, tensors = _read_weights(path)
        return cfg, None, _strip_peft_keys(wfile, tensors), "peft"
    if peft_type == "PREFIX_TUNING":
        wfile, tensors = _read_weights(path)
        cfg, tensors = _from_peft_prefix(cfg_file, d, tensors)
        return cfg, None, tensors, "peft"
    if peft_type == "BOTTLENECK":
        cfg = _from_llm_adapters(cfg_file, d)
        wfile, tensors = _read_weights(path)
        return cfg, None, _strip_peft_keys(wfile, tensors), "llm-adapters"
    raise ValueError(f"{cfg_file}: unknown adapter format (\"format\": {d.get('format')!r}, \"peft_type\": "
                     f"{peft_type!r}); readable: fastadapters files, PEFT LORA and PREFIX_TUNING, "
                     "LLM-Adapters BOTTLENECK")


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def _file_modules(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths the file's keys belong to; a ValueError on the first key that fits no module."""
    linears = [p for p, m in patching._linear_modules(model).items()
               if p and isinstance(m, SUPPORTED_BASES + (AdapterLinear,))]
    known = set(linears)
    paths: set[str] = set()
    for key in sorted(tensors):
        mod = _module_of_key(key)
        if mod == PREFIX_KEY:
            continue
        if not mod or mod not in known:
            raise ValueError(f"key {key!r} fits no module of this model (no linear layer "
                             f"{mod or '(none)'!r} to carry it)")
        paths.add(mod)
    return [p for p in linears if p in paths]  # in the model's order


def _resolve_placements(model: nn.Module, cfg: AdapterConfig, tensors: dict[str, torch.Tensor],
                        recorded: dict[str, str] | None) -> tuple[AdapterConfig, dict[str, str]]:
    """The config to patch with and its placements, matching the modules the file has weights for."""
    if isinstance(cfg, PrefixConfig):
        return cfg, {}
    paths = _file_modules(model, tensors)
    recorded = recorded or None
    wanted = set(recorded) if recorded else set(paths)
    kinds = None
    try:
        kinds = patching._resolve_targets(model, cfg)
    except ValueError:
        pass
    if kinds is None or set(kinds) != wanted:  # name the modules in full so patch picks exactly these
        order = list(recorded) if recorded else paths
        cfg = type(cfg).from_dict({**cfg.to_dict(), "target_modules": order})
        kinds = patching._resolve_targets(model, cfg)
    if recorded:
        for p, kind in recorded.items():
            if kinds.get(p) != kind:
                raise ValueError(f"module {p!r} carries a {kind!r} adapter in the file but would get "
                                 f"{kinds.get(p)!r} on this model")
    return cfg, kinds


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                   source: str) -> dict[str, torch.Tensor]:
    """Shapes and dtypes against ``expected``; the file's tensors, reshaped where only a size-1 dim differs."""
    unknown = sorted(k for k in tensors if k not in expected)
    if unknown:
        raise ValueError(f"key {unknown[0]!r} fits no adapter parameter of this model "
                         f"(expected keys like {next(iter(expected), '(none)')!r})")
    out = {}
    for key, want in expected.items():  # the model's order: the first key that disagrees is reported
        if key not in tensors:
            continue
        t = tensors[key]
        got = tuple(t.shape)
        if got != want:
            if t.numel() == 1 and math.prod(want) == 1:  # LLM-Adapters stores a learned scaling as (1,)
                t = t.reshape(want)
            else:
                raise ValueError(f"key {key!r}: shape {list(got)} in {source} does not fit this model, "
                                 f"which expects {list(want)}")
        if not (t.is_floating_point()):
            raise ValueError(f"key {key!r}: dtype {t.dtype} in {source}; adapter weights must be floating point")
        out[key] = t
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source} lacks adapter weights for this model: {missing[:5]}{more}")
    return out


def _same_config(a: AdapterConfig, b: AdapterConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return sorted(k for k in set(da) | set(db) if k != "target_modules" and da.get(k) != db.get(k))


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 backend: str | None = None, *, read=None) -> nn.Module:
    """Load the adapter in directory ``path`` into ``model`` as adapter ``name`` (default "default").

    The name is the caller's, never the file's: adapter files record no name (a folder may be loaded
    under any name, into several models or twice into one), so without ``name=`` the adapter is
    registered as ``"default"`` whatever it was called when saved -- as PEFT's ``from_pretrained``
    does. Pass ``name=`` to hold several adapters; loading into a name the model already carries
    replaces that adapter's weights (same config) or is refused (another config).

    The format (fastadapters, PEFT LoRA, LLM-Adapters) is detected from ``adapter_config.json``.
    A model that does not carry adapter ``name`` yet is patched with the file's config (beside any
    adapters it already has; it becomes the active adapter only when none is active, e.g. when it is the
    first one).
    If it already carries ``name`` with the same configuration, the weights are replaced. Every
    key, shape and config field is checked before the model changes: on error the model is
    exactly as it was. Returns the model.

    ``read``: what ``read_adapter(path)`` returned, when the files were read elsewhere (the serving
    engine reads them in the caller's thread, so that its step loop only patches and copies).
    """
    name = "default" if name is None else name
    source = os.fspath(path)
    cfg, recorded, tensors, fmt = read_adapter(source) if read is None else read
    if fmt == "peft" and isinstance(cfg, PrefixConfig):
        _check_peft_prefix_geometry(model, os.path.join(source, CONFIG_NAME))
    st = patching._state(model)
    existing = st is not None and name in st.configs
    from .ops import dispatch

    dispatch.check_backend_name(backend)
    if existing:
        have = st.configs[name]
        if type(have) is not type(cfg):
            raise ValueError(f"adapter {name!r} on this model is {have.adapter_type!r} but {source} holds "
                             f"{cfg.adapter_type!r}; pick another name or delete_adapter(model, {name!r}) first")
        diff = _same_config(have, cfg)
        if diff:
            raise ValueError(f"adapter {name!r} on this model differs from {source} in {diff}; pick another "
                             f"name or delete_adapter(model, {name!r}) first")
        kinds = dict(st.kinds[name])
        if not isinstance(cfg, PrefixConfig):
            _file_modules(model, tensors)  # a key that fits no module gets its own message
        if recorded and recorded != kinds:
            diff = sorted(p for p in set(recorded) | set(kinds) if recorded.get(p) != kinds.get(p))
            raise ValueError(f"adapter {name!r} on this model is placed differently than in {source} "
                             f"(first difference at {diff[0]!r}: {kinds.get(diff[0])!r} here, "
                             f"{recorded.get(diff[0])!r} in the file)")
    else:
        patching._check_name(st, name)
        cfg, kinds = _resolve_placements(model, cfg, tensors, recorded)
    expected = _expected_shapes(model, cfg, kinds)
    tensors = _check_tensors(tensors, expected, source)

    # ---- apply: nothing above changed the model ----
    if existing:
        params = _adapter_entries(model, name)
        backup = {k: p.detach().clone() for k, p in params.items()}
        try:
            with torch.no_grad():
                for k, t in tensors.items():
                    distributed.copy_whole(params[k], t)  # a sharded parameter keeps its own part
        except BaseException:
            with torch.no_grad():
                for k, t in backup.items():
                    params[k].copy_(t)
            raise
        if backend is not None and backend != st.backend:
            patching.set_backend(model, backend)  # as patch does: a later backend is applied, not ignored
        return model
    previous = (st.active, st.backend) if st is not None else None
    patching.patch(model, config=cfg, name=name, backend=backend)
    try:
        if dict(patching._require_state(model).kinds[name]) != kinds:  # pragma: no cover - defensive
            raise RuntimeError(f"patch placed adapter {name!r} differently than load_adapter checked")
        params = _adapter_entries(model, name)
        with torch.no_grad():
            for k, t in tensors.items():
                params[k].copy_(t)
    except BaseException:
        patching.delete_adapter(model, name)
        if previous is not None:  # patch may have made it active / set the backend: put both back
            patching.set_backend(model, previous[1])
            patching.set_adapter(model, previous[0])
        raise
    return model
