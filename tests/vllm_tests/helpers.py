"""A bounded vLLM OpenAI server in a subprocess on a loopback port, and greedy requests to it."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _log_excerpt(log) -> str:
    """The lines that name an error (first of each), then the log's tail: enough to see why vLLM failed."""
    log.seek(0)
    text = log.read()
    seen, errors = set(), []
    for line in text.splitlines():
        tail = line.split("] ", 1)[-1]
        if ("Error" in tail or "error" in tail) and tail not in seen:
            seen.add(tail)
            errors.append(line)
    return (f"(whole log kept at {log.name})\n" + "\n".join(errors[:40]) + "\n--- log tail ---\n"
            + text[-3000:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str, args: list[str], *, timeout: float = 600, env: dict | None = None,
                served_name: str = "smollm2"):
    """Start ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (its own process group), wait
    for /health, yield the base URL; on exit stop the whole group (SIGTERM, then SIGKILL after 20 s).
    The server's log goes to a temporary file, printed when it fails to start."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), *args]
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default (4) is much more than these tests need
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    failed = True
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode} before serving:\n{_log_excerpt(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not serve within {timeout:.0f} s:\n{_log_excerpt(log)}")
            time.sleep(1)
        failed = False
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        if not failed:
            os.unlink(log.name)


def vllm_greedy(url: str, model: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids from vLLM's /v1/completions for a prompt given as token ids."""
    import httpx

    r = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return list(choice["token_ids"])
