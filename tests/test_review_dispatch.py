"""Review: without triton installed, the multi-adapter op must not offer a triton backend.

The LoRA and bottleneck ops register their triton backend only where triton is importable, so
``auto`` on CUDA takes another backend (with a one-time warning when it falls back to torch) and an
explicit ``backend="triton"`` says why it cannot run. The multi-adapter op registered its triton
backend unconditionally: ``auto`` chose it and the call died importing triton. Checked in a
subprocess where ``import triton`` fails (nothing touches CUDA: ``resolve`` reads the device type).
"""
from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = r"""
import sys
sys.modules["triton"] = None  # import triton fails; importlib.util.find_spec("triton") is None
import torch
from fastadapters.ops import dispatch, multi  # noqa: F401
from fastadapters.serving import routing  # noqa: F401
for op in ("lora_linear", "bottleneck_parallel", "multi_adapter"):
    assert "triton" not in dispatch._IMPLS[op], (op, sorted(dispatch._IMPLS[op]))
    assert dispatch.resolve(op, None, torch.device("cuda")) != "triton", op
    try:
        dispatch.resolve(op, "triton", torch.device("cuda"))
    except RuntimeError as e:
        assert "has no triton implementation" in str(e), str(e)
    else:
        raise AssertionError(op + ": explicit triton resolved without triton")
print("OK")
"""


def test_no_triton_backend_without_triton():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
