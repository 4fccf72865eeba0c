"""GPU validation of the compiled kernels (marked gpu, skipped without CUDA).

The conftest runs this folder's kernels through the interpreter, so the device checks run
gpu_check.py in a subprocess without TRITON_INTERPRET (compiled kernels on the GPU).
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py")], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"gpu_check.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
