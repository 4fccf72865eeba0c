"""Run a command under ``torchrun`` with N local processes on a free loopback port, gloo, with a timeout.

A hang (a collective one rank never joins) must fail the test, not block CI: the launcher runs in
its own process group, which is killed whole when the timeout passes.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None,
             cwd: str | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc <args>``; output captured. On timeout
    the whole process group is killed and AssertionError says so, with the output so far."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun {' '.join(args)} did not finish in {timeout:.0f} s (killed); "
                             f"output:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
