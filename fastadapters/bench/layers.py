"""The serving table of issue 4: one linear layer serving B rows from A distinct LoRA adapters.

For each mode (decode: 1 token per row; prefill: T tokens per row), B rows, A distinct adapters
(rows assigned round-robin, A <= B) and rank setting ("16", or "mixed": ranks 1, 4, 8, 16, 64 in
turn) it times, on the same weights:

  fa          base GEMM + ``multi_adapter`` (rows routed by slot; the per-forward plan is built
              once outside the timing, as every layer of a model shares it)
  peft        PEFT's ``adapter_names=`` mixed batch (its Python loop over adapters)
  sequential  the layer run once per adapter on that adapter's rows (base GEMM + LoRA each time)
  merged      one merged adapter: the base GEMM alone (W + s·B·A folded in: what a single-adapter
              deployment pays)
  fa_graph,   on CUDA, decode rows: fa and merged replayed from a captured CUDA graph (no Python or
  merged_graph  launch overhead: how serving engines run decode); PEFT's loop cannot be captured (it
              builds index tensors on the host) and is timed eagerly, as it runs

and reports each as time over the *memory floor*: bytes that must be read or written at least once
(base weight, x, y, and each distinct adapter's A and B once) over the bandwidth measured in the same
run (a large copy). On CUDA: Llama-7B q_proj shapes (4096 x 4096), bf16, T = 128, the Triton
backend, ``triton.testing.do_bench``. On the CPU (``quick``): 512 x 512, fp32, T = 8, the torch
backend, a wall clock -- a table that finishes in about a minute.

``bench_serving_table(device, quick=True) -> dict`` (``rows`` holds one dict per measurement) is
what ``fastadapters bench`` calls; ``bench/serving.py`` is the stand-alone script.
"""
from __future__ import annotations

import itertools
import math

import torch

from ..ops.multi import build_plan, multi_adapter

MIXED_RANKS = (1, 4, 8, 16, 64)


def _timer():
    from .harness import time_fn  # the shared harness (warm-up, median; do_bench on CUDA)

    return time_fn


def measured_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    a.fill_(1.0)
    t = _timer()(lambda: b.copy_(a), device, warmup=2, repeats=5)
    return 2 * nbytes / t


def _ranks(setting: str, a: int) -> list[int]:
    return [16] * a if setting == "16" else [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(a)]


def _peft_layer(weight: torch.Tensor, As, Bs, ranks, scales):
    """A PEFT LoRA ``Linear`` over ``weight`` with adapters a0..a{A-1} (None if peft is missing)."""
    try:
        import peft
    except ImportError:
        return None
    n, k = weight.shape
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        holder.proj.weight.copy_(weight)
    pm = None
    for i, r in enumerate(ranks):
        cfg = peft.LoraConfig(r=r, lora_alpha=scales[i] * r, target_modules=["proj"])
        if pm is None:
            pm = peft.get_peft_model(holder, cfg, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", cfg)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        for i in range(len(ranks)):
            layer.lora_A[f"a{i}"].weight.copy_(As[i])
            layer.lora_B[f"a{i}"].weight.copy_(Bs[i])
    pm.eval()
    return layer


_PEFT_CACHE: dict = {}


def _adapters(device, dtype, k: int, n: int, a: int, setting: str):
    """(w, As, Bs, ranks, scales, peft layer or None) for A adapters; cached across B and modes."""
    key = (str(device), dtype, k, n, a, setting)
    if key not in _PEFT_CACHE:
        _PEFT_CACHE.clear()  # one set of weights alive at a time
        g = torch.Generator().manual_seed(a * 7 + len(setting))
        ranks = _ranks(setting, a)
        w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, dtype)
        As = [(torch.randn(r, k, generator=g) / math.sqrt(k)).to(device, dtype) for r in ranks]
        Bs = [(torch.randn(n, r, generator=g) * 0.01).to(device, dtype) for r in ranks]
        scales = [2.0] * a
        _PEFT_CACHE[key] = [w, As, Bs, ranks, scales, None]
    return _PEFT_CACHE[key]


def bench_case(device, dtype, k: int, n: int, rows: int, tokens: int, a: int, setting: str, bw: float,
               backend: str, repeats: int, with_peft: bool = True) -> dict:
    time_fn = _timer()
    g = torch.Generator().manual_seed(rows * 1000 + a)
    m = rows * tokens
    entry = _adapters(device, dtype, k, n, a, setting)
    w, As, Bs, ranks, scales, _ = entry
    R = max(ranks)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    down = torch.zeros(a, R, k, device=device, dtype=dtype)
    up = torch.zeros(a, n, R, device=device, dtype=dtype)
    for i, r in enumerate(ranks):
        down[i, :r], up[i, :, :r] = As[i], Bs[i]
    sizes = torch.tensor(ranks, dtype=torch.int32, device=device)
    sc = torch.tensor(scales, dtype=torch.float32, device=device)
    act = torch.zeros(a, dtype=torch.int32, device=device)
    per_row = torch.arange(rows) % a
    row_slot = per_row.repeat_interleave(tokens).to(torch.int32).to(device)
    plan = build_plan(row_slot, a)
    sizes_host = sizes.cpu()
    act_host = act.cpu()

    def fa_step():
        y0 = x @ w.t()
        return multi_adapter(y0, x, row_slot, down, up, sizes, sc, act, plan=plan, backend=backend,
                             sizes_host=sizes_host, act_host=act_host, check=False)

    def merged_step():
        return x @ w.t()

    groups = [torch.nonzero(row_slot == i).flatten() for i in range(a)]

    def sequential_step():
        y = torch.empty(m, n, device=device, dtype=dtype)
        for i, idx in enumerate(groups):
            xi = x[idx]
            y[idx] = xi @ w.t() + scales[i] * ((xi @ As[i].t()) @ Bs[i].t())
        return y

    with torch.no_grad():
        res = {"fa": time_fn(fa_step, device, repeats=repeats),
               "merged": time_fn(merged_step, device, repeats=repeats),
               "sequential": time_fn(sequential_step, device, repeats=repeats)}
        if with_peft and entry[5] is None:
            entry[5] = _peft_layer(w, As, Bs, ranks, scales) or False
        layer = entry[5] if with_peft else None
        if layer:
            x3 = x.view(rows, tokens, k)
            names_rows = [f"a{int(i)}" for i in per_row]
            res["peft"] = time_fn(lambda: layer(x3, adapter_names=names_rows), device, repeats=repeats)
        graph_error = None
        if device.type == "cuda" and tokens == 1:  # decode as serving engines run it: from a CUDA graph
            try:
                res["fa_graph"] = time_fn(fa_step, device, repeats=repeats, cuda_graph=True)
                res["merged_graph"] = time_fn(merged_step, device, repeats=repeats, cuda_graph=True)
            except Exception as e:  # reported in the row, never a silent gap
                graph_error = f"{type(e).__name__}: {e}"[:300]
        # correctness guard: the table never reports a wrong kernel
        ref = sequential_step()
        got = fa_step()
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        if not torch.allclose(got.float(), ref.float(), atol=tol * max(1.0, ref.abs().max().item()), rtol=0):
            raise AssertionError(f"fa multi_adapter disagrees with the sequential loop for rows={rows} A={a}")
    es = torch.tensor([], dtype=dtype).element_size()
    floor_bytes = es * (n * k + m * k + m * n + sum(r * (k + n) for r in ranks))
    floor = floor_bytes / bw
    out = {"mode": "decode" if tokens == 1 else "prefill", "B": rows, "T": tokens, "A": a, "ranks": setting,
           "K": k, "N": n, "floor_us": floor * 1e6}
    for key, t in res.items():
        out[f"{key}_us"] = t * 1e6
        out[f"{key}_over_floor"] = t / floor
    if graph_error is not None:
        out["graph_error"] = graph_error
    if "fa_graph" in res and "merged_graph" in res:
        out["fa_graph_over_merged_graph"] = res["fa_graph"] / res["merged_graph"]
    if "peft" in res:
        out["peft_over_fa"] = res["peft"] / res["fa"]
    out["sequential_over_fa"] = res["sequential"] / res["fa"]
    out["fa_over_merged"] = res["fa"] / res["merged"]
    return out


def bench_serving_table(device: str | torch.device | None = None, quick: bool = True, repeats: int | None = None,
                        with_peft: bool = True, partial_on_interrupt: bool = False) -> dict:
    """Measure the serving table (see the module docstring); returns a JSON-able record.
    ``partial_on_interrupt``: a KeyboardInterrupt (a time limit's SIGINT) ends the table early and
    the rows so far come back marked ``truncated`` (bench/serving.py); otherwise it propagates."""
    from .harness import environment

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        k = n = 4096
        dtype, tokens, backend = torch.bfloat16, 128, "triton"
        bs, as_ = (1, 8, 32, 64), (1, 8, 32, 64)
        repeats = repeats or 5
    else:
        k = n = 256 if quick else 512
        dtype, tokens, backend = torch.float32, 8 if quick else 32, "torch"
        bs, as_ = ((1, 8, 32, 64), (1, 8, 32, 64))
        repeats = repeats or (5 if quick else 9)
    bw = measured_bandwidth(device, (64 if device.type == "cpu" else 1024) << 20)
    rows = []
    threads = torch.get_num_threads()
    if device.type == "cpu" and quick:
        torch.set_num_threads(1)  # steadier on a shared machine; recorded in the result
    truncated = False
    used_threads = torch.get_num_threads()
    try:
        for setting, a in itertools.product(("16", "mixed"), as_):
            if setting == "mixed" and a == 1:
                continue  # one adapter (rank 1): nothing mixed to show
            for tok, b in itertools.product((1, tokens), bs):
                if a <= b:
                    rows.append(bench_case(device, dtype, k, n, b, tok, a, setting, bw, backend, repeats, with_peft))
        used_threads = torch.get_num_threads()
    except KeyboardInterrupt:  # a time limit (SIGINT): keep the rows measured so far, marked
        if not partial_on_interrupt:
            raise
        truncated = True
    finally:
        torch.set_num_threads(threads)
        _PEFT_CACHE.clear()
    order = {"decode": 0, "prefill": 1}
    rows.sort(key=lambda r: (order[r["mode"]], r["ranks"] != "16", r["B"], r["A"]))
    out = {"benchmark": "serving_multi_adapter", "env": environment(device), "dtype": str(dtype),
           "backend": backend, "threads": used_threads, "bandwidth_GBps": bw / 1e9, "rows": rows}
    if truncated:
        out["truncated"] = True
    return out


def render_serving(result: dict) -> str:
    """The table as markdown: times in microseconds and each over the memory floor."""
    env = result.get("env", {})
    head = (f"multi-adapter serving, one {result['rows'][0]['K']}x{result['rows'][0]['N']} linear, "
            f"{result['dtype']}, backend {result['backend']}, on {env.get('device')} "
            f"(bandwidth {result['bandwidth_GBps']:.1f} GB/s)") if result["rows"] else "no rows"
    lines = [head, "",
             "| mode | B | A | ranks | floor us | fa us (x floor) | PEFT us (x floor) | sequential us (x floor) "
             "| merged us (x floor) | PEFT/fa | seq/fa | fa/merged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, key):
        if f"{key}_us" not in r:
            return "-"
        return f"{r[f'{key}_us']:.0f} ({r[f'{key}_over_floor']:.1f})"

    graphs = any("fa_graph_us" in r for r in result["rows"])  # CUDA: the graph-replayed column too
    if graphs:
        lines[2] = lines[2].replace("| PEFT us", "| fa graph us (x floor) | PEFT us")
        lines[3] += "---|"
    for r in result["rows"]:
        peft = f"{r['peft_over_fa']:.1f}" if "peft_over_fa" in r else "-"
        fa = cell(r, "fa") + (f" | {cell(r, 'fa_graph')}" if graphs else "")
        lines.append(f"| {r['mode']} | {r['B']} | {r['A']} | {r['ranks']} | {r['floor_us']:.1f} | {fa} "
                     f"| {cell(r, 'peft')} | {cell(r, 'sequential')} | {cell(r, 'merged')} | {peft} "
                     f"| {r['sequential_over_fa']:.1f} | {r['fa_over_merged']:.2f} |")
    return "\n".join(lines)


def summary(result: dict) -> dict:
    """The table's headline: PEFT's mixed-adapter batch over fastadapters' on the decode row with
    the most adapters (the serving case)."""
    from .harness import summary_line

    rows = [r for r in result["rows"] if r["mode"] == "decode" and "peft_over_fa" in r]
    row = max(rows, key=lambda r: (r["A"], r["B"], r["ranks"] == "mixed"), default=None)
    value = row["peft_over_fa"] if row else None
    note = f"decode B={row['B']} A={row['A']} ranks {row['ranks']}" if row else "PEFT not installed"
    return summary_line("layers", "PEFT / fa mixed-adapter batch", value, "x", "above", 1.0,
                        "above 1: one fused call beats PEFT's loop over adapters", None, note=note)
