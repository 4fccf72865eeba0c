"""Our adapter files (``fa.save_adapter(format="fastadapters")``) as vLLM LoRA tensors.

``read_fastadapters(path)`` returns ``None`` for a folder that is not ours (PEFT's files go to vLLM
untouched), else ``(peft_config, tensors, activation)``: a PEFT-shaped config (``r`` the bottleneck
size, ``lora_alpha == r`` so vLLM's own scaling is 1), tensors under PEFT's names
(``base_model.model.<module>.lora_A.weight`` = D, ``lora_B.weight`` = s·U, folded in fp32), and the
activation name (``"identity"`` for LoRA). Series adapters are read the same way (D as A, s·U as B);
their placements (``placements(path)``: ``output`` reads the layer's output, ``mh`` feeds the layer's
input) are applied when vLLM puts the adapter in a slot (``_vllm_internals``). Prefix-tuning is refused
here with the reason, before any tensor reaches vLLM. No vLLM import: the tests run it without vLLM.
"""
from __future__ import annotations

import json
import os

ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "silu", "swish", "sigmoid")
PEFT_PREFIX = "base_model.model."


class AdapterRefused(ValueError):
    """An adapter of ours that the plugin cannot serve on vLLM (the message says why)."""


def _config(path: str) -> dict | None:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg if cfg.get("format") == "fastadapters" else None


def is_fastadapters(path: str) -> bool:
    return _config(path) is not None


def read_fastadapters(path: str):
    cfg = _config(path)
    if cfg is None:
        return None
    import torch
    from safetensors.torch import load_file

    kind = cfg.get("adapter_type")
    modules: dict[str, str] = cfg.get("modules") or {}
    where = f"adapter {path!r}"
    if kind == "prefix":
        raise AdapterRefused(f"{where} is prefix-tuning: vLLM has no prompt adapters (removed in V1); "
                             "serve it with `fastadapters serve`")
    if kind not in ("lora", "parallel", "series"):
        raise AdapterRefused(f"{where}: unknown adapter_type {kind!r}; valid here: lora, parallel, series")
    if cfg.get("dropout"):
        pass  # dropout is a training-time op: nothing to serve
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    out: dict[str, "torch.Tensor"] = {}
    if kind == "lora":
        r, alpha = int(cfg["r"]), float(cfg["alpha"])
        for key, t in tensors.items():
            out[PEFT_PREFIX + key] = t
        peft = {"r": r, "lora_alpha": alpha, "use_rslora": bool(cfg.get("use_rslora", False)),
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "bias": "none"}
        return peft, out, "identity"
    act = cfg.get("non_linearity", "tanh")
    if act not in ACTIVATIONS:
        raise AdapterRefused(f"{where}: non_linearity {act!r} is not one of {', '.join(ACTIVATIONS[1:])}")
    b = int(cfg["bottleneck_size"])
    scaling = cfg.get("scaling", 1.0)
    for module, placement in modules.items():
        if placement not in ("parallel", "output", "mh"):
            raise AdapterRefused(f"{where}: module {module} has placement {placement!r}; valid: parallel, output, mh")
        down = tensors[f"{module}.adapter_down.weight"]
        up = tensors[f"{module}.adapter_up.weight"]
        s = tensors[f"{module}.adapter_scaling"].double() if scaling == "learned" else float(scaling)
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = down
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (up.double() * s).to(up.dtype)
    peft = {"r": b, "lora_alpha": b, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
            "bias": "none"}
    return peft, out, "silu" if act == "swish" else act


def placements(path: str) -> dict[str, str]:
    """{module path: "lora" | "parallel" | "output" | "mh"} of one of our adapters ({} if not ours)."""
    cfg = _config(path)
    return dict(cfg.get("modules") or {}) if cfg else {}
