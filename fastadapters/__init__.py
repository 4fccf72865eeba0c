"""fastadapters: the LLM-Adapters adapter family on Hugging Face models, with fused kernels.

    import fastadapters as fa
    fa.patch(model, adapter="lora", r=16, alpha=32, dropout=0.05)
    fa.patch(model, adapter="series", variant="houlsby", bottleneck_size=256)
    fa.save_adapter(model, "out/"); fa.load_adapter(model, "out/")
    fa.merge_and_unload(model)    # LoRA folded into the base weights, plain model back
    fa.unpatch(model)
"""
__version__ = "0.1.0"

from .config import AdapterConfig, LoRAConfig, ParallelConfig, PrefixConfig, SeriesConfig  # noqa: F401
from .merge import merge, merge_and_unload  # noqa: F401
from .patching import (  # noqa: F401
    adapter_names,
    delete_adapter,
    get_config,
    patch,
    set_adapter,
    set_backend,
    trainable_parameters,
    unpatch,
)


def __getattr__(name):  # io and serving import lazily (safetensors, routing) to keep import cheap
    if name in ("save_adapter", "load_adapter"):
        from . import io

        return getattr(io, name)
    if name in ("route",):
        from .serving import routing

        return getattr(routing, name)
    raise AttributeError(f"module 'fastadapters' has no attribute {name!r}")
