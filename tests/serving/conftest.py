"""The serving tests run the Triton multi-adapter kernels on the CPU through the interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, so it is set at conftest
import, and ``fastadapters.kernels.multi`` is reloaded if something imported it earlier. (The
offline sm_80/sm_90 compile test runs in a subprocess without it.)
"""
import importlib
import os
import sys

if os.environ.get("FASTADAPTERS_TEST_GPU_RUN") != "1":  # see tests/conftest.py: `-m gpu` runs real kernels
    os.environ["TRITON_INTERPRET"] = "1"

if "fastadapters.kernels.multi" in sys.modules:
    importlib.reload(sys.modules["fastadapters.kernels.multi"])
