"""fastadapters: the LLM-Adapters adapter family on Hugging Face models, with fused kernels.

    import fastadapters as fa
    fa.patch(model, adapter="lora", r=16, alpha=32, dropout=0.05)
    fa.patch(model, adapter="series", variant="houlsby", bottleneck_size=256)
    fa.save_adapter(model, "out/"); fa.load_adapter(model, "out/")
    fa.merge_and_unload(model)    # LoRA folded into the base weights, plain model back
    fa.unpatch(model)

Only the configs are imported eagerly; every other name (and submodule) is imported on first use
(PEP 562), so that ``import fastadapters`` -- and with it the ``fastadapters`` command's ``--help``
and usage errors -- does not pay for torch and transformers.
"""
import importlib
import importlib.util

__version__ = "0.1.0"

from .config import AdapterConfig, LoRAConfig, ParallelConfig, PrefixConfig, SeriesConfig  # noqa: F401,E402

# public name -> the submodule that defines it
_LAZY = {
    **dict.fromkeys(("adapter_names", "delete_adapter", "get_config", "patch", "set_adapter", "set_backend",
                     "trainable_parameters", "unpatch"), "patching"),
    "merge": "merging",
    "merge_and_unload": "merging",
    "save_adapter": "io",
    "load_adapter": "io",
    "route": "serving.routing",
}

__all__ = ["AdapterConfig", "LoRAConfig", "ParallelConfig", "PrefixConfig", "SeriesConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # fa.patching, fa.models, ...
    raise AttributeError(f"module 'fastadapters' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
