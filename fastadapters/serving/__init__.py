"""Serving one base model with many adapters: the adapter store and per-row routing.

    import fastadapters as fa
    fa.load_adapter(model, "math/", name="math"); fa.load_adapter(model, "chat/", name="chat")
    with fa.route(model, ["math", None, "chat"]):          # one adapter (or None) per batch row
        out = model.generate(input_ids, max_new_tokens=32)
    fastadapters.serving.configure(model, max_slots=16)   # more adapters than device slots: LRU

``store.py`` stacks every adapter's weights per layer in global slots; ``routing.py`` runs each
``AdapterLinear`` as pre (mh) / base / post (LoRA, parallel) / output phases over those stacks with
``fastadapters.ops.multi`` (one name per row, or per segment of a packed row). The benchmarks
of these (the multi-adapter layer table, the engine end to end) live in ``fastadapters.bench``.

The generation engine and server (``fastadapters serve``), bottom to top: ``kv_blocks.py`` (KV
in fixed-size blocks), ``sampling.py``, ``scheduler.py`` (requests, continuous batching),
``adapters.py`` (served names, versions, path confinement), ``paged_attention.py`` (each
request's attention over its own blocks; ``flashinfer_attention.py`` on CUDA), ``lm_head.py``
(the oneDNN-packed LM head on the CPU), ``detokenizer.py`` (incremental), ``hf_compat.py`` (the
only transformers internals), ``engine.py`` (the step loop; no HTTP), then ``protocol.py`` /
``metrics.py`` / ``api.py`` (FastAPI) and ``serve.py`` (the command). Submodules import lazily.
"""


def __getattr__(name):
    if name == "route":
        from .routing import route

        return route
    if name in ("configure", "get_store", "AdapterStore"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'fastadapters.serving' has no attribute {name!r}")
