"""fastadapters' vLLM plugin: serve parallel adapters (y = Wx + b + s·U·act(D·x)) in the same batch as
LoRA adapters, from the files ``fa.save_adapter`` writes.

Registered as the ``vllm.general_plugins`` entry point ``fastadapters``; vLLM calls ``register()`` in
every process it starts (API server, engine core, workers) before the model is built. Nothing here is
imported by ``import fastadapters``, and this package imports nothing of fastadapters' main package.

How a parallel adapter rides on vLLM's LoRA machinery: it has LoRA's placement and shape (D is
``lora_A``, U is ``lora_B``), so vLLM's own ``--lora-modules`` / ``/v1/load_lora_adapter`` load it into a
LoRA slot; the plugin (``files.py``) reads our format, folds the scaling s into U, and records the
adapter's activation; ``_vllm_internals.py`` applies, per token, its slot's activation between vLLM's
shrink and expand (identity for LoRA slots). Every use of vLLM internals lives in that one module,
which refuses to start on a vLLM release outside ``TESTED_VLLM``.
"""
from __future__ import annotations

TESTED_VLLM = ("0.32.",)  # release prefixes the tests ran (tests/vllm_tests); others refuse at start


def register() -> None:
    """The entry point vLLM calls. Checks the vLLM version, then installs the hooks (idempotent)."""
    from . import _vllm_internals

    _vllm_internals.install()
