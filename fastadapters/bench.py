"""``fastadapters bench``: training-step time and memory of each adapter type against PEFT, then
the per-layer kernel table (``fastadapters.kernel_bench``), the multi-adapter serving table, and the
end-to-end serving table (``fastadapters.serving.e2e_bench``: the engine over a Zipf stream of
requests for A adapters, against base-only requests and PEFT's padded ``generate``).

Also the shared benchmark harness (``time_fn``, ``saved_activation_bytes``, ``environment``,
``append_results``) that the scripts in ``bench/`` import, so every number is taken the same way:
warm-up, then the median of repeats (``triton.testing.do_bench`` on CUDA, a wall clock on the
CPU). A benchmark measures; it never asserts speed.

The default model is embedded (a small Llama-architecture config with random weights: nothing is
downloaded). Rows: the frozen base (forward + backward into the input embeddings, no weight
gradients: what an adapter on every layer pays at least; an adapter only on late linears, such as
Pfeiffer's, can stop its backward earlier and come in under it), PEFT LoRA, and fastadapters LoRA, series (Houlsby, Pfeiffer), parallel
and prefix. The figure of merit is a ratio from the same run: fastadapters / PEFT for LoRA, and
every row / frozen base.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from typing import TYPE_CHECKING, Callable

from .cli import CommandParser, UsageError, check_device, run_command

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions that use it: `fastadapters bench --help` and a mistyped
# flag answer without paying for it (fastadapters.cli)

PRESETS = {
    # name: (LlamaConfig kwargs, batch, seq)
    "micro": (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2), 2, 32),
    "tiny": (dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4), 4, 128),
    "1b": (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4), 4, 2048),
}


# ---------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------

def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5,
            cuda_graph: bool = False) -> float:
    """Median seconds per call of ``fn`` on ``device``: on CUDA ``triton.testing.do_bench`` (about
    10·warmup ms of warm-up, 20·repeats ms of timed calls; ``cuda_graph``: ``do_bench_cudagraph``,
    the calls replayed from a captured graph, so no Python or launch overhead -- how serving engines
    run decode); on the CPU the wall clock of ``repeats`` calls after ``warmup``."""
    if device.type == "cuda":
        import triton.testing

        if cuda_graph:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") / 1e3
        return triton.testing.do_bench(fn, warmup=10 * warmup, rep=20 * repeats, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward while ``fn`` runs (distinct storages counted once)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import torch

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    commit = os.environ.get("FASTADAPTERS_GIT_COMMIT")  # a device run gets a copy of the tree, no .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
            "peft": version("peft"), "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def append_results(path: str, record: dict) -> None:
    """Append ``record`` to the JSON list at ``path`` (atomic replace)."""
    data = []
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.append(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# training-step table
# ---------------------------------------------------------------------------------------------

def _build_model(preset: str, device, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**PRESETS[preset][0])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _variants(r: int, dropout: float, bottleneck: int):
    return [
        ("frozen base", None, {}),
        ("PEFT lora", "peft", dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])),
        ("fa lora", "lora", dict(r=r, alpha=2 * r, dropout=dropout)),
        ("fa series houlsby", "series", dict(variant="houlsby", bottleneck_size=bottleneck)),
        ("fa series pfeiffer", "series", dict(variant="pfeiffer", bottleneck_size=bottleneck)),
        ("fa parallel", "parallel", dict(bottleneck_size=bottleneck)),
        ("fa prefix", "prefix", dict(num_virtual_tokens=30)),
    ]


def _prepare(model, kind, fields):
    import fastadapters as fa

    if kind is None:
        for p in model.parameters():
            p.requires_grad_(False)
        # backward into the inputs: every layer's dX runs, no weight gradient (the adapter floor)
        emb = model.get_input_embeddings()
        hook = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, lambda: hook.remove()
    if kind == "peft":
        import peft

        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **fields))
        return pm, lambda: pm.unload()
    fa.patch(model, adapter=kind, **fields)
    return model, lambda: fa.unpatch(model)


def training_step_table(preset: str = "tiny", device: str | None = None, dtype: str | None = None,
                        r: int = 16, dropout: float = 0.05, bottleneck: int = 64, repeats: int = 5,
                        only: list[str] | None = None, log=print) -> dict:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg_kwargs, batch, seq = PRESETS[preset]
    model = _build_model(preset, dev, dt)
    model.train()
    ids = torch.randint(0, cfg_kwargs["vocab_size"], (batch, seq), device=dev)
    variants = [v for v in _variants(r, dropout, bottleneck) if not only or any(o in v[0] for o in only)]
    # On the CPU the variants are timed round-robin on their own copies of the model, so slow drift
    # of the machine (other processes, allocator warm-up) hits every variant alike; on CUDA
    # do_bench is steady and one model is patched and unpatched in turn (no copies in GPU memory).
    interleave = dev.type != "cuda"
    rows, steps = [], {}
    for label, kind, fields in variants:
        try:
            m, undo = _prepare(copy.deepcopy(model) if interleave else model, kind, fields)
        except ImportError as e:
            log(f"  skipped {label}: {e}")
            continue

        def step(m=m):
            out = m(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            for p in m.parameters():
                p.grad = None

        saved = saved_activation_bytes(lambda: m(input_ids=ids, labels=ids, use_cache=False).loss)
        row = {"variant": label, "saved_activation_MiB": saved / 2**20}
        if interleave:
            steps[label] = step
        else:
            try:
                row["step_s"] = time_fn(step, dev, warmup=2, repeats=repeats)
                peak = peak_memory(step, dev)
                row["peak_MiB"] = None if peak is None else peak / 2**20
            finally:
                undo()
        rows.append(row)
    if interleave:
        times: dict[str, list[float]] = {label: [] for label in steps}
        for rep in range(repeats + 2):  # two warm-up rounds
            for label, step in steps.items():
                t0 = time.perf_counter()
                step()
                if rep >= 2:
                    times[label].append(time.perf_counter() - t0)
        for row in rows:
            row["step_s"] = statistics.median(times[row["variant"]])
            row["peak_MiB"] = None
    for row in rows:
        row["tokens_per_s"] = batch * seq / row["step_s"]
        log(f"  {row['variant']:<20} {row['step_s'] * 1e3:9.1f} ms/step")
    by = {r_["variant"]: r_ for r_ in rows}
    base = by.get("frozen base")
    for row in rows:
        row["vs_frozen_base"] = row["step_s"] / base["step_s"] if base else None
    if "PEFT lora" in by and "fa lora" in by:
        by["fa lora"]["vs_peft"] = by["fa lora"]["step_s"] / by["PEFT lora"]["step_s"]
        by["fa lora"]["saved_vs_peft"] = by["fa lora"]["saved_activation_MiB"] / by["PEFT lora"]["saved_activation_MiB"]
    return {"benchmark": "training_step", "preset": preset, "model": cfg_kwargs, "batch": batch, "seq": seq,
            "dtype": str(dt).replace("torch.", ""), "r": r, "lora_dropout": dropout, "bottleneck_size": bottleneck,
            "env": environment(dev), "rows": rows}


def render(result: dict) -> str:
    env = result["env"]
    lines = [f"Training step, {result['preset']} Llama config ({result['model']['num_hidden_layers']} layers, "
             f"hidden {result['model']['hidden_size']}), batch {result['batch']} x seq {result['seq']}, "
             f"{result['dtype']}, on {env['device']} ({env['device_type']}, {env['threads']} threads), "
             f"LoRA r={result['r']} dropout={result['lora_dropout']}, bottleneck {result['bottleneck_size']}",
             "",
             f"| {'variant':<20} | {'ms/step':>9} | {'tokens/s':>9} | {'saved act MiB':>13} | {'peak MiB':>9} "
             f"| {'vs base':>7} | {'vs PEFT':>7} |",
             "|" + "|".join("-" * w for w in (22, 11, 11, 15, 11, 9, 9)) + "|"]
    for row in result["rows"]:
        peak = "-" if row["peak_MiB"] is None else f"{row['peak_MiB']:.0f}"
        vs_peft = f"{row['vs_peft']:.3f}" if "vs_peft" in row else "-"
        vs_base = f"{row['vs_frozen_base']:.3f}" if row.get("vs_frozen_base") else "-"
        lines.append(f"| {row['variant']:<20} | {row['step_s'] * 1e3:9.1f} | {row['tokens_per_s']:9.0f} "
                     f"| {row['saved_activation_MiB']:13.1f} | {peak:>9} | {vs_base:>7} | {vs_peft:>7} |")
    return "\n".join(lines)


# The end-to-end serving section: the engine on the random "small" Llama (hidden 256, 4 layers,
# vocab 2048). On the CPU a quick configuration (it adds well under a minute on 2 cores); on CUDA
# issue 13's A = 1, 8, 32 at bench/serving_e2e.py's defaults.
E2E_CPU = dict(adapter_counts=(1, 8), requests=16, max_tokens=16, prompt_lens=(8, 32), max_num_seqs=8, parity=4)
E2E_CUDA = dict(adapter_counts=(1, 8, 32), requests=32, max_tokens=16, prompt_lens=(8, 64), max_num_seqs=16,
                parity=8)


def e2e_section(device: str, dtype: str | None) -> dict:
    """The end-to-end serving record for ``fastadapters bench`` on ``device`` (``E2E_CPU`` / ``E2E_CUDA``)."""
    import torch

    from .serving.e2e_bench import run_e2e

    cuda = torch.device(device).type == "cuda"
    return run_e2e("small", device=device, dtype=dtype or ("bfloat16" if cuda else "float32"),
                   **(E2E_CUDA if cuda else E2E_CPU))


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="fastadapters bench", description=(
        "Time training steps (forward + backward) of each adapter type against PEFT LoRA and the frozen base,\n"
        "then the per-layer kernel table, the multi-adapter serving table and the end-to-end serving table\n"
        "(the engine over a stream of requests for 1, 8 (CUDA: 32) adapters), on embedded Llama configs\n"
        "with random weights (nothing is downloaded)."))
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model size (default: tiny on CPU, 1b on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (kernel table too)")
    ap.add_argument("--bottleneck-size", type=int, default=64, help="series/parallel bottleneck width")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row (the median is reported)")
    ap.add_argument("--only", nargs="*", help="run only variants whose label contains one of these words")
    ap.add_argument("--no-serving", action="store_true", help="skip the multi-adapter serving table")
    ap.add_argument("--no-e2e", action="store_true",
                    help="skip the end-to-end serving table (engine tokens/s, TTFT, TPOT vs base-only and PEFT)")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-layer kernel table")
    ap.add_argument("--json", metavar="PATH", help="append the numbers to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_command("fastadapters bench", _run, argv)


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    device = check_device(args.device)
    if args.device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: the bench runs on cpu or cuda")
    preset = args.preset or ("1b" if device.startswith("cuda") else "tiny")
    print(f"fastadapters bench: preset {preset}")
    result = training_step_table(preset, args.device, args.dtype, args.r, args.dropout, args.bottleneck_size,
                                 args.repeats, args.only)
    print()
    print(render(result))
    records = [result]
    if not args.no_kernels:
        from .kernel_bench import kernel_table, render_kernel_table

        print()
        dev = result["env"]["device_type"]
        kernels = kernel_table(dev, args.dtype or ("bfloat16" if dev == "cuda" else "float32"), quick=True,
                               dropout=args.dropout, repeats=args.repeats, log=lambda msg: None)
        print(render_kernel_table(kernels))
        records.append(kernels)
    if not args.no_serving:
        try:
            from .serving.bench import bench_serving_table, render_serving
        except ImportError:
            bench_serving_table = None
        if bench_serving_table is not None:
            print()
            serving = bench_serving_table(args.device, quick=True)
            print(render_serving(serving))
            records.append(serving)
    if not args.no_e2e:
        from .serving.e2e_bench import render_e2e

        print()
        e2e = e2e_section(args.device or result["env"]["device_type"], args.dtype)
        print(render_e2e(e2e))
        records.append(e2e)
    if args.json:
        for rec in records:
            append_results(args.json, rec)
        print(f"\nappended {len(records)} record(s) to {args.json}")
    return 0
