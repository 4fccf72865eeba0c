"""Kernel benchmark: fused Triton LoRA linear and bottleneck adapters vs their baselines.

    python bench/kernels.py                      # CUDA: Llama-7B / Llama-3-8B projections, bf16
    python bench/kernels.py --quick              # CUDA: one shape per family
    python bench/kernels.py --smoke              # CPU: tiny shapes through the Triton interpreter
    python bench/kernels.py --json bench/results/kernels.json

``fastadapters bench`` prints the quick table too (``kernel_table``): on CUDA the quick shapes, on
the CPU one Llama-like projection where "fused" is the torch path (the Triton interpreter measures
nothing useful), so the CPU numbers compare fastadapters' hand-written torch LoRA with PEFT's layer.

LoRA rows, per (model, projection, M, r), forward ("fwd") and forward+backward ("full"), training
mode with dropout p (default 0.05), bias-free projections as in Llama:
  base    the frozen base alone: F.linear forward, backward into x only (the cuBLAS floor)
  fused   fastadapters' op on the table's backend (`lora_linear(backend="triton")` on CUDA)
  addmm   the Unsloth-style plain-torch path (`lora_linear(backend="torch")`: addmm + hand backward)
  peft    PEFT's LoRA layer (adapters in fp32, as get_peft_model's autocast_adapter_dtype leaves them)
with the ratios fused/base and peft/fused from the same run, peak memory and the bytes autograd
saves per token. Bottleneck rows (output placement: y = h + s·f(h); parallel: y = xWᵀ + s·f(x)),
b in {64, 256}: fused vs unfused torch, and for the output placement the bytes-over-bandwidth floor
(`--bandwidth-gbs`, default 3350 = H100 SXM HBM3) of reading/writing h, y, P, dy, dh.
CPU decode rows (``kind`` lora_decode / parallel_decode / series_decode), per M in 1, 2, 8, 64: one
adapted layer's forward under ``torch.inference_mode`` in eval mode (dropout configured, so off),
where Python and dispatch overhead, not the GEMMs, set the time:
  base    the plain ``nn.Linear``
  fused   fastadapters' ``AdapterLinear`` (LoRA r=16; parallel / series (output placement) b=64)
  peft    PEFT's ``lora.Linear`` on the same base (LoRA rows only: PEFT has no bottleneck adapters)
timed round-robin in the same run (each round times every implementation over a loop of calls;
the median round; ``fwd_ms`` wall clock, ``fwd_cpu_ms`` process CPU time), with the ratios
fused/base and peft/fused for both (``*_fwd``, ``*_fwd_cpu``); the markdown shows µs.
Timing comes from the shared harness (`fastadapters.bench.harness.time_fn`: `triton.testing.do_bench` on
CUDA, a wall clock on the CPU). It measures; it never asserts speed.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import harness

SHAPES = {  # model: {projection: (K, N)}
    "llama-7b": {"qkvo": (4096, 4096), "gate_up": (4096, 11008), "down": (11008, 4096)},
    "llama-3-8b": {"q_o": (4096, 4096), "k_v": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)},
}
MS = (2048, 8192)
RANKS = (8, 16, 64)
BOTTLENECKS = (64, 256)


#: the CPU rows of ``fastadapters bench``: a 1024-wide projection, 512 tokens
CPU_CASES = (("cpu", "proj1024", 512, 1024, 1024, 16),)
CPU_BN_CASES = (("cpu", "proj1024", 512, 1024, 1024, 64),)
#: CPU decode rows: one adapted layer's forward at M rows (M = batch of sequences, one token each),
#: (proj, K, N, LoRA rank r, bottleneck size b): SmolLM2-135M's q_proj and the 1024-wide projection above
DECODE_MS = (1, 2, 8, 64)
DECODE_CASES = (("proj576", 576, 576, 16, 64), ("proj1024", 1024, 1024, 16, 64))


def _lora_impls(torch, K, N, r, dtype, device, dropout, fused_backend="triton"):
    """name -> module-like callable x -> y."""
    import torch.nn as nn

    from fastadapters.ops.lora import lora_linear

    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(device=device, dtype=torch.float32).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).to(device=device, dtype=torch.float32).requires_grad_()
    s = 2.0
    impls = {
        "base": lambda x: torch.nn.functional.linear(x, W),
        "fused": lambda x: lora_linear(x, W, None, A, B, s, dropout, True, backend=fused_backend),
    }
    if fused_backend != "torch":
        impls["addmm"] = lambda x: lora_linear(x, W, None, A, B, s, dropout, True, backend="torch")
    try:
        import peft
        from peft.tuners.lora import layer as peft_lora

        base = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        base.weight.data.copy_(W)
        base.weight.requires_grad_(False)
        kw = dict(r=r, lora_alpha=int(s * r), lora_dropout=dropout)
        try:  # peft >= 0.18 passes the LoraConfig to the layer
            pl = peft_lora.Linear(base, "default", peft.LoraConfig(**kw), **kw)
        except TypeError:
            pl = peft_lora.Linear(base, "default", **kw)
        pl.lora_A["default"].to(torch.float32)
        pl.lora_B["default"].to(torch.float32)
        pl.train()
        impls["peft"] = pl
    except ImportError:
        pass
    return impls


def _bottleneck_impls(torch, placement, K, N, b, dtype, device, dropout, fused_backend="triton"):
    from fastadapters.ops.bottleneck import bottleneck_linear

    g = torch.Generator(device="cpu").manual_seed(1)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    d_in, d_out = (N, N) if placement == "output" else (K, N)
    D = (torch.randn(b, d_in, generator=g) / d_in**0.5).to(device=device, dtype=torch.float32).requires_grad_()
    U = (torch.randn(d_out, b, generator=g) / b**0.5).to(device=device, dtype=torch.float32).requires_grad_()
    base = (W, None)

    def run(backend):
        return lambda x: bottleneck_linear(placement, x, base, D, U, 1.0, "relu", dropout, True, backend=backend)

    impls = {"base": lambda x: torch.nn.functional.linear(x, W), "fused": run(fused_backend)}
    if fused_backend != "torch":
        impls["unfused"] = run("torch")
    return impls


def _qkv_impls(torch, K, outs, r, dtype, device, dropout, kind="lora"):
    """q/k/v on one input: the frozen bases, three single ops, and the grouped op (X read once);
    ``kind`` "lora" (rank r) or "parallel" (bottleneck r, relu)."""
    from fastadapters.ops.bottleneck import bottleneck_linear, parallel_linear_group
    from fastadapters.ops.lora import lora_linear, lora_linear_group

    g = torch.Generator(device="cpu").manual_seed(2)
    Ws = [(torch.randn(n, K, generator=g) / K**0.5).to(device=device, dtype=dtype) for n in outs]
    As = [(torch.randn(r, K, generator=g) / K**0.5).to(device=device).requires_grad_() for _ in outs]
    Bs = [(torch.randn(n, r, generator=g) / r**0.5).to(device=device).requires_grad_() for n in outs]
    s = 2.0
    nones = [None] * len(Ws)
    if kind == "parallel":
        return {
            "base": lambda x: [torch.nn.functional.linear(x, w) for w in Ws],
            "single": lambda x: [bottleneck_linear("parallel", x, (w, None), a, b, s, "relu", dropout, True,
                                                   backend="triton") for w, a, b in zip(Ws, As, Bs)],
            "grouped": lambda x: parallel_linear_group(x, Ws, nones, As, Bs, [s] * len(Ws), "relu", dropout, True,
                                                       backend="triton"),
        }
    return {
        "base": lambda x: [torch.nn.functional.linear(x, w) for w in Ws],
        "single": lambda x: [lora_linear(x, w, None, a, b, s, dropout, True, backend="triton")
                             for w, a, b in zip(Ws, As, Bs)],
        "grouped": lambda x: lora_linear_group(x, Ws, nones, As, Bs, [s] * len(Ws), dropout, True,
                                               backend="triton"),
    }


def _decode_layers(torch, kind, K, N, width, device, dtype, dropout):
    """name -> module, one adapted projection in eval mode (see the module docstring): the plain
    linear, fastadapters' AdapterLinear on it and, for LoRA, PEFT's layer on it with the same weights."""
    import torch.nn as nn

    from fastadapters.config import LoRAConfig, ParallelConfig, SeriesConfig
    from fastadapters.layers import AdapterLinear

    g = torch.Generator(device="cpu").manual_seed(3)
    base = nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
    layer = AdapterLinear(base)
    if kind == "lora":
        layer.add_adapter("default", LoRAConfig(r=width, alpha=2 * width, dropout=dropout), "lora")
    elif kind == "parallel":
        layer.add_adapter("default", ParallelConfig(bottleneck_size=width, dropout=dropout), "parallel")
    else:  # series: the output placement (h = Wx; y = h + s·f(h)), Pfeiffer's and Houlsby's FFN one
        layer.add_adapter("default", SeriesConfig(bottleneck_size=width, dropout=dropout), "output")
    layer.active_adapter = "default"
    with torch.no_grad():  # LoRA's B starts at zero: every adapter weight nonzero, as after training
        for p in layer.adapter_parameters("default"):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    impls = {"base": base, "fused": layer.eval()}
    if kind == "lora":
        try:
            import peft
            from peft.tuners.lora import layer as peft_lora
        except ImportError:
            return impls
        kw = dict(r=width, lora_alpha=2 * width, lora_dropout=dropout)
        try:  # peft >= 0.18 passes the LoraConfig to the layer
            pl = peft_lora.Linear(base, "default", peft.LoraConfig(**kw), **kw)
        except TypeError:
            pl = peft_lora.Linear(base, "default", **kw)
        with torch.no_grad():
            pl.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            pl.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
        impls["peft"] = pl.eval()
    return impls


def _time_decode(torch, harness, impls, x, device, rounds, loop_s=0.004):
    """Per-forward cost of each module on ``x`` under inference_mode, in ms: ``fwd_ms`` wall clock
    (the shared harness), ``fwd_cpu_ms`` this process's CPU time over the same loop (on a machine
    other jobs share, the steadier figure of the two: time spent descheduled is not counted).
    Every round times each implementation over a loop of about ``loop_s`` seconds, one after the
    other, so a change of load falls on all of them alike; the median round per implementation."""
    import statistics
    import time

    wall = {name: [] for name in impls}
    cpu = {name: [] for name in impls}
    with torch.inference_mode():
        loops = {}
        for name, fn in impls.items():  # warm-up, then the loop length from one timed call
            per_call = harness.time_fn(lambda: fn(x), device, warmup=3, repeats=3)
            loops[name] = max(1, min(5000, int(loop_s / max(per_call, 1e-7))))
        for _ in range(rounds):
            for name, fn in impls.items():
                n = loops[name]

                def loop(fn=fn, n=n):
                    for _ in range(n):
                        fn(x)

                c0 = time.process_time()
                wall[name].append(harness.time_fn(loop, device, warmup=0, repeats=1) / n)
                cpu[name].append((time.process_time() - c0) / n)
    return {name: {"fwd_ms": 1e3 * statistics.median(wall[name]), "fwd_cpu_ms": 1e3 * statistics.median(cpu[name]),
                   "calls_per_round": loops[name], "fwd_ms_rounds": [1e3 * t for t in wall[name]],
                   "fwd_cpu_ms_rounds": [1e3 * t for t in cpu[name]]} for name in impls}


def _run_decode_rows(torch, harness, device, dt, rows, cases, ms, dropout, rounds, log):
    for proj, K, N, r, b in cases:
        for kind in ("lora", "parallel", "series"):
            width = r if kind == "lora" else b
            impls = _decode_layers(torch, kind, K, N, width, device, dt, dropout)
            for M in ms:
                x = torch.randn(M, K, device=device, dtype=dt)
                res = _time_decode(torch, harness, impls, x, device, rounds)
                wkey = "r" if kind == "lora" else "b"
                row = dict(kind=f"{kind}_decode", model=device.type, proj=proj, M=M, K=K, N=N, **{wkey: width},
                           dropout=dropout, fused_backend="torch", threads=torch.get_num_threads(), impls=res)
                for key in ("fwd_ms", "fwd_cpu_ms"):  # the ratios by wall clock and by CPU time
                    suffix = "fwd" if key == "fwd_ms" else "fwd_cpu"
                    row[f"fused_over_base_{suffix}"] = res["fused"][key] / res["base"][key]
                    rounds_of = lambda name: res[name][f"{key}_rounds"]  # noqa: E731
                    row[f"fused_over_base_{suffix}_stats"] = harness.ratio_stats(
                        [f / b for f, b in zip(rounds_of("fused"), rounds_of("base"))])
                    if "peft" in res:
                        row[f"peft_over_fused_{suffix}"] = res["peft"][key] / res["fused"][key]
                        row[f"peft_over_fused_{suffix}_stats"] = harness.ratio_stats(
                            [p / f for p, f in zip(rounds_of("peft"), rounds_of("fused"))])
                rows.append(row)
                log(_render_row(row))


def _measure_multi(torch, harness, fn, x, device, repeats, warmup=2):
    """_measure for a callable returning several outputs (one gradient each)."""
    dys = [torch.randn_like(y) for y in fn(x)]

    def full():
        torch.autograd.backward(fn(x), dys)

    rec = {"fwd_ms": 1e3 * harness.time_fn(lambda: fn(x), device, warmup=warmup, repeats=repeats),
           "full_ms": 1e3 * harness.time_fn(full, device, warmup=warmup, repeats=repeats)}
    rec["bwd_ms"] = rec["full_ms"] - rec["fwd_ms"]
    return rec


def _measure(torch, harness, fn, x, device, repeats, warmup=2):
    dy = torch.randn(x.shape[0], fn(x).shape[-1], device=device, dtype=x.dtype)

    def fwd():
        return fn(x)

    def full():
        fn(x).backward(dy)

    rec = {
        "fwd_ms": 1e3 * harness.time_fn(fwd, device, warmup=warmup, repeats=repeats),
        "full_ms": 1e3 * harness.time_fn(full, device, warmup=warmup, repeats=repeats),
        "saved_bytes_per_token": harness.saved_activation_bytes(fwd) / x.shape[0],
    }
    rec["bwd_ms"] = rec["full_ms"] - rec["fwd_ms"]
    rec["peak_mem_bytes"] = harness.peak_memory(full, device)
    return rec


def _output_floor_bytes(M, d, b, elt):
    # fwd: read h, write y, write P (fp32); bwd: read dy, h, P, write dh
    return M * d * elt * 2 + M * b * 4 + M * d * elt * 3 + M * b * 4


def kernel_table(device: str, dtype: str, quick: bool = False, smoke: bool = False, dropout: float = 0.05,
                 repeats: int = 5, bandwidth_gbs: float = 3350.0, log=print, partial_on_interrupt: bool = False) -> dict:
    """Time the LoRA and bottleneck rows (see the module docstring) and return the record.

    CUDA: the Llama shapes (``quick``: two shapes, one M, rank 16), fused = Triton. CPU with
    ``smoke``: tiny shapes, fused = Triton under the interpreter. CPU otherwise: ``CPU_CASES``, fused =
    the torch path."""
    import torch

    from . import harness

    device = torch.device(device)
    dt = getattr(torch, dtype)
    rows = []
    fused_backend = "triton" if (device.type == "cuda" or smoke) else "torch"
    if smoke:
        lora_cases = [("smoke", "proj", 33, 48, 40, 4)]
        bn_cases = [("smoke", "proj", 33, 48, 40, 8)]
    elif device.type != "cuda":
        lora_cases, bn_cases = list(CPU_CASES), list(CPU_BN_CASES)
    else:
        shapes = [(m, p, K, N) for m, projs in SHAPES.items() for p, (K, N) in projs.items()]
        if quick:
            shapes = [s for s in shapes if s[1] in ("qkvo", "gate_up")][:2]
        ms = MS[:1] if quick else MS
        ranks = (16,) if quick else RANKS
        lora_cases = [(m, p, M, K, N, r) for (m, p, K, N) in shapes for M in ms for r in ranks]
        bn_cases = [(m, p, M, K, N, b) for (m, p, K, N) in shapes if p in ("qkvo", "q_o")
                    for M in ms for b in (BOTTLENECKS[:1] if quick else BOTTLENECKS)]
    warmup = 1 if smoke else 2
    try:
        _run_rows(torch, harness, device, dt, rows, lora_cases, bn_cases, fused_backend, smoke, quick, dropout,
                  repeats, warmup, bandwidth_gbs, log)
        if device.type != "cuda" and not smoke:  # decode: one layer's forward at a few rows
            _run_decode_rows(torch, harness, device, dt, rows, DECODE_CASES[:1] if quick else DECODE_CASES,
                             DECODE_MS, dropout, max(5, repeats), log)
        truncated = False
    except KeyboardInterrupt:  # a time limit (SIGINT, bench/gpu_session.sh): keep the rows so far, marked
        if not partial_on_interrupt:
            raise
        truncated = True
    out = dict(benchmark="kernels", dtype=dtype, env=harness.environment(device), rows=rows)
    if truncated:
        out["truncated"] = True
    return out


def _run_rows(torch, harness, device, dt, rows, lora_cases, bn_cases, fused_backend, smoke, quick, dropout,
              repeats, warmup, bandwidth_gbs, log):
    for model, proj, M, K, N, r in lora_cases:
        impls = _lora_impls(torch, K, N, r, dt, device, dropout, fused_backend)
        x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
        res = {name: _measure(torch, harness, fn, x, device, repeats, warmup) for name, fn in impls.items()}
        row = dict(kind="lora", model=model, proj=proj, M=M, K=K, N=N, r=r, dropout=dropout,
                   fused_backend=fused_backend, impls=res)
        row["fused_over_base_full"] = res["fused"]["full_ms"] / res["base"]["full_ms"]
        if "peft" in res:
            row["peft_over_fused_full"] = res["peft"]["full_ms"] / res["fused"]["full_ms"]
            row["saved_fused_over_peft"] = (res["fused"]["saved_bytes_per_token"]
                                            / max(res["peft"]["saved_bytes_per_token"], 1))
        rows.append(row)
        log(_render_row(row))

    if fused_backend == "triton":  # sibling projections sharing X: the grouped kernels vs three single ops
        if smoke:
            qkv_cases = [("lora", "smoke", 33, 48, (40, 16, 16), 4), ("parallel", "smoke", 33, 48, (40, 16, 16), 8)]
        else:
            ms = MS[:1] if quick else MS
            qkv_cases = [("lora", "llama-3-8b", M, 4096, (4096, 1024, 1024), r) for M in ms
                         for r in ((16,) if quick else RANKS)]
            qkv_cases += [("parallel", "llama-3-8b", M, 4096, (4096, 1024, 1024), b) for M in ms
                          for b in (BOTTLENECKS[:1] if quick else BOTTLENECKS)]
        for kind, model, M, K, outs, r in qkv_cases:
            impls = _qkv_impls(torch, K, outs, r, dt, device, dropout, kind)
            x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
            res = {name: _measure_multi(torch, harness, fn, x, device, repeats, warmup) for name, fn in impls.items()}
            width = {"r": r} if kind == "lora" else {"b": r}
            row = dict(kind=f"{kind}_qkv_group", model=model, proj="q,k,v", M=M, K=K, N=sum(outs), outs=list(outs),
                       **width, dropout=dropout, fused_backend=fused_backend, impls=res,
                       fused_over_base_full=res["grouped"]["full_ms"] / res["base"]["full_ms"],
                       grouped_over_single_full=res["grouped"]["full_ms"] / res["single"]["full_ms"])
            rows.append(row)
            log(_render_row(row))

    elt = torch.finfo(dt).bits // 8
    for model, proj, M, K, N, b in bn_cases:
        for placement in ("output", "parallel"):
            impls = _bottleneck_impls(torch, placement, K, N, b, dt, device, dropout, fused_backend)
            x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
            res = {name: _measure(torch, harness, fn, x, device, repeats, warmup) for name, fn in impls.items()}
            row = dict(kind=f"bottleneck_{placement}", model=model, proj=proj, M=M, K=K, N=N, b=b,
                       dropout=dropout, fused_backend=fused_backend, impls=res)
            row["fused_over_base_full"] = res["fused"]["full_ms"] / res["base"]["full_ms"]
            if "unfused" in res:
                row["unfused_over_fused_full"] = res["unfused"]["full_ms"] / res["fused"]["full_ms"]
            if placement == "output" and device.type == "cuda":  # the floor is an HBM figure
                floor_ms = 1e3 * _output_floor_bytes(M, N, b, elt) / (bandwidth_gbs * 1e9)
                # the adapter's share: fused (base + adapter) minus the base alone
                adapter_ms = res["fused"]["full_ms"] - res["base"]["full_ms"]
                row["adapter_floor_ms"] = floor_ms
                row["adapter_over_floor"] = adapter_ms / floor_ms
            rows.append(row)
            log(_render_row(row))


def render_kernel_table(result: dict) -> str:
    """Markdown table of a ``kernel_table`` record: forward+backward ms per implementation, then the
    decode rows (forward µs per implementation) if any."""
    rows = [r for r in result["rows"] if not r["kind"].endswith("_decode")]
    decode = [r for r in result["rows"] if r["kind"].endswith("_decode")]
    names = []
    for row in rows:
        names += [n for n in row["impls"] if n not in names]
    backend = rows[0]["fused_backend"] if rows else "?"
    lines = [] if not rows else [
        f"Kernels ({result['dtype']}, {result['env'].get('device', '')}; fused = {backend} backend), "
        "forward+backward ms; ratios from this run:", "",
        "| row | shape | " + " | ".join(names) + " | fused/base | peft/fused |",
        "|---|---|" + "---|" * len(names) + "---|---|"]
    for row in rows:
        cells = [f"{row['impls'][n]['full_ms']:.3f}" if n in row["impls"] else "" for n in names]
        peft = f"{row['peft_over_fused_full']:.2f}" if "peft_over_fused_full" in row else ""
        lines.append(f"| {row['kind']} | {_shape(row)} | " + " | ".join(cells)
                     + f" | {row['fused_over_base_full']:.2f} | {peft} |")
    if decode:
        if lines:
            lines.append("")
        lines += [f"Decode, one layer's forward in eval under inference_mode ({result['dtype']}, "
                  f"{result['env'].get('device', '')}, {decode[0]['threads']} torch threads): µs per call, "
                  "median of round-robin rounds; wall clock, and CPU time (steadier where other jobs share "
                  "the machine):", "",
                  "| row | shape | base | fused | peft | fused/base | peft/fused | CPU: base | fused | peft "
                  "| fused/base | peft/fused |", "|---|---|" + "---|" * 10]
        for row in decode:
            cells = []
            for key, suffix in (("fwd_ms", "fwd"), ("fwd_cpu_ms", "fwd_cpu")):
                cells += [f"{1e3 * row['impls'][n][key]:.1f}" if n in row["impls"] else ""
                          for n in ("base", "fused", "peft")]
                for ratio in ("fused_over_base", "peft_over_fused"):
                    name = f"{ratio}_{suffix}"
                    if name not in row:
                        cells.append("")
                    elif row.get(f"{name}_stats"):  # per-round ratios: a spread wider than the effect is noise
                        cells.append(harness.format_ratio(row[f"{name}_stats"]))
                    else:  # records from before the per-round ratios
                        cells.append(f"{row[name]:.2f}")
            lines.append(f"| {row['kind']} | {_shape(row)} | " + " | ".join(cells) + " |")
        if any(v.get("noisy") for r in decode for k, v in r.items() if k.endswith("_stats") and v):
            lines += ["", "noise (low-high): the ratio's range over the rounds is wider than its distance from 1 -- "
                          "the machine's noise, not a result (CPU time, the right half, is the steadier)"]
    return "\n".join(lines)


def _shape(row):
    return f"M={row['M']} K={row['K']} N={row['N']} " + (f"r={row['r']}" if "r" in row else f"b={row['b']}")


def _render_row(row):
    if row["kind"].endswith("_decode"):
        impls = " ".join(f"{k}={1e3 * v['fwd_ms']:.1f}us(cpu {1e3 * v['fwd_cpu_ms']:.1f}us)"
                         for k, v in row["impls"].items())
    else:
        impls = " ".join(f"{k}={v['full_ms']:.3f}ms" for k, v in row["impls"].items())
    shape = f"{row['model']}/{row['proj']} {_shape(row)}"
    extra = " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "dropout")
    return f"{row['kind']:<20} {shape:<48} {impls}  {extra}"


def main(argv=None, default_json: str = os.path.join("bench", "results", "kernels.json")) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--quick", action="store_true", help="CUDA: one M, one rank, two shapes")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; on the CPU the Triton kernels run through TRITON_INTERPRET=1")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="memory bandwidth for the floor")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads (1 keeps the decode rows steady on a shared machine)")
    ap.add_argument("--json", default=default_json,
                    help="append the record here ('' to skip)")
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        if args.smoke and "fastadapters.kernels.lora" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        if args.smoke:
            args.repeats = min(args.repeats, 2)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    result = kernel_table(args.device, args.dtype, args.quick, args.smoke, args.dropout, args.repeats,
                          args.bandwidth_gbs, partial_on_interrupt=True)
    print()
    print(render_kernel_table(result))
    if args.json:
        from .harness import append_results

        append_results(args.json, result)
        print(f"appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def summary(result: dict) -> dict:
    """The table's headline: PEFT's LoRA layer over the fused one, forward + backward, on the first
    LoRA shape (CUDA: Triton kernels; CPU: the torch path)."""
    lora = next((r for r in result["rows"] if r["kind"] == "lora" and "peft_over_fused_full" in r), None)
    value = lora["peft_over_fused_full"] if lora else None
    note = f"{_shape(lora)}, fused = {lora['fused_backend']}" if lora else "no PEFT row"
    return harness.summary_line("kernels", "PEFT / fused LoRA layer fwd+bwd", value, "x", "above", 1.0,
                                "above 1: the fused layer is faster", None, note=note)
