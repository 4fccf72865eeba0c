"""Triton kernel tests run on the CPU through the interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels (the decorator picks the
interpreter then), so it is set here, at conftest import; kernel modules imported earlier by other
test folders are reloaded so their kernels are re-decorated for the interpreter.
"""
import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

for _name in ("fastadapters.kernels._common", "fastadapters.kernels.lora", "fastadapters.kernels.bottleneck"):
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
