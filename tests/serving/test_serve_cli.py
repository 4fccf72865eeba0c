"""`fastadapters serve` as a user runs it: flags, errors (exit 2, one line), and a real process.

The process test saves a tiny llama with a character tokenizer and a Houlsby adapter, starts
``python -m fastadapters.cli serve`` on a free 127.0.0.1 port with ``--adapter`` and
``--adapter-root``, waits for /health, runs a completion on the adapter and a runtime load, then
starts a request that would run for minutes and sends SIGTERM: the process must drain for
``--shutdown-timeout`` (1 s), abort the request, log its shutdown line and exit (else it is killed
after a bounded wait).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

import fastadapters as fa
from fastadapters.cli import main as cli_main
from fastadapters.serving.serve import main

from .char_tokenizer import char_tokenizer
from .helpers import add_zoo, tiny_llama


def test_bad_flags_exit_2_with_one_line(tmp_path, capsys):
    assert main(["--base-model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--base-model", str(tmp_path), "--adapter", "noequals"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["--base-model", str(tmp_path), "--max-num-seqs", "0"]) == 2
    assert "max-num-seqs" in capsys.readouterr().err
    assert main(["--base-model", str(tmp_path), "--dtype", "int8"]) == 2
    assert main(["--base-model", str(tmp_path), "--adapter-root", str(tmp_path / "nope")]) == 2
    assert cli_main(["serve", "--help"]) == 0
    assert "--adapter-root" in capsys.readouterr().out


def _long_stream(url: str) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 50000,
                                                               "ignore_eos": True, "stream": True}, timeout=120) as s:
            for _ in s.iter_lines():
                pass
    except httpx.HTTPError:
        pass


def _generating(url: str) -> bool:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return any(line.startswith("fastadapters:num_requests_running ") and float(line.split()[-1]) >= 1
               for line in text.splitlines())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_end_to_end(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    add_zoo(model, ["houlsby"])
    fa.save_adapter(model, tmp_path / "root" / "h", name="houlsby")
    port = _free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")  # a shared 2-core CI machine
    proc = subprocess.Popen([sys.executable, "-m", "fastadapters.cli", "serve", "--base-model", str(tmp_path / "base"),
                             "--served-model-name", "tiny", "--adapter", f"h={tmp_path / 'root' / 'h'}",
                             "--adapter-root", str(tmp_path / "root"), "--port", str(port), "--max-num-seqs", "4",
                             "--shutdown-timeout", "1", "--max-model-len", "60000", "--allow-long-max-model-len"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.2)
        ids = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert set(ids) == {"tiny", "h"} and ids["h"]["parent"] == "tiny"
        r = httpx.post(f"{url}/v1/completions", json={"model": "h", "prompt": "hello", "max_tokens": 4,
                                                       "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "h2", "lora_path": str(tmp_path / "root" / "h")},
                       timeout=60)
        assert r.status_code == 200, r.text
        # SIGTERM with a request that would run for minutes: drained for --shutdown-timeout, then aborted
        long = threading.Thread(target=_long_stream, args=(url,), daemon=True)
        long.start()
        deadline = time.monotonic() + 30
        while not _generating(url):
            assert time.monotonic() < deadline, "the long request did not start"
            time.sleep(0.1)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - t
        out = proc.stdout.read().decode()
        assert took < 10, (took, out[-2000:])
        assert "shutting down" in out and "1 aborted" in out, out[-2000:]
        assert "status=200 model='h' adapter='h' prompt_tokens=5 completion_tokens=4" in out  # the access log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_model_threads_leave_a_core_to_the_server(monkeypatch):
    """On the CPU the model gets all usable cores but one (at least one); OMP_NUM_THREADS or
    --threads override that."""
    from fastadapters.serving.serve import build_parser, cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_threads(None)[0] == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cpu_threads(None)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(None) == (2, "OMP_NUM_THREADS")
    assert cpu_threads(5) == (5, "--threads")
    assert build_parser().parse_args(["--base-model", "x", "--threads", "3"]).threads == 3
