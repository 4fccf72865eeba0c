"""Shared fixtures over the tiny-model factory in tiny_models.py (tiny configs for llama, mistral,
qwen2, opt, bloom, gptj, gpt2, gpt_neox; hidden 32, 2 layers, built in code, nothing downloaded)."""
from __future__ import annotations

import pytest

from tiny_models import tiny_model


@pytest.fixture
def make_tiny():
    """Factory fixture: ``make_tiny("llama")`` -> a fresh tiny model."""
    return tiny_model
