"""``fastadapters bench``: the training-step table (``training``), the per-layer kernel table
(``kernels``), the multi-adapter layer table (``layers``) and the end-to-end serving table (``e2e``:
the engine over a Zipf stream of requests for A adapters, against base-only requests and PEFT's
padded ``generate``), on embedded Llama configs with random weights.
"""
from __future__ import annotations

import argparse
import os

from ..cli import CommandParser, UsageError, check_device, run_command
from .harness import append_results, render_summary
from .training import PRESETS, render, training_step_table

# torch is imported inside the functions that use it: `fastadapters bench --help` and a mistyped
# flag answer without paying for it (fastadapters.cli)

# The end-to-end serving section: the engine on the random "small" Llama (hidden 256, 4 layers,
# vocab 2048), A = 1, 8, 32 (issue 19), with HF's batched generate of the base model as the yardstick.
# On the CPU a quick configuration (fewer, shorter requests); on CUDA bench/serving_e2e.py's defaults.
E2E_CPU = dict(adapter_counts=(1, 8, 32), requests=16, max_tokens=16, prompt_lens=(8, 32), max_num_seqs=8, parity=4)
E2E_CUDA = dict(adapter_counts=(1, 8, 32), requests=32, max_tokens=16, prompt_lens=(8, 64), max_num_seqs=16,
                parity=8)


def e2e_section(device: str, dtype: str | None, vllm_python: str | None = None) -> dict:
    """The end-to-end serving record for ``fastadapters bench`` on ``device`` (``E2E_CPU`` / ``E2E_CUDA``);
    ``vllm_python``: also vLLM's offline engine in that Python (``run_e2e``)."""
    import torch

    from .e2e import run_e2e

    cuda = torch.device(device).type == "cuda"
    return run_e2e("small", device=device, dtype=dtype or ("bfloat16" if cuda else "float32"),
                   vllm_python=vllm_python, **(E2E_CUDA if cuda else E2E_CPU))


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="fastadapters bench", description=(
        "Time training steps (forward + backward) of each adapter type against PEFT LoRA and the frozen base,\n"
        "then the per-layer kernel table, the multi-adapter serving table and the end-to-end serving table\n"
        "(the engine over a stream of requests for 1, 8, 32 adapters), on embedded Llama configs\n"
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
    ap.add_argument("--vllm-python", metavar="PY", default=None,
                    help="end-to-end table: also vLLM's offline engine, run in this Python (a venv with vLLM), on "
                         "the same prompts with LoRA adapters of the same ranks")
    ap.add_argument("--json", metavar="PATH", help="append the numbers to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run_command("fastadapters bench", _run, argv)


# Seconds each table takes with the defaults, printed up front as the duration hint. CPU: preset
# tiny on a 2-core machine, measured 35 / 9 / 4 / 17 s with one torch thread while three other test
# runs shared it (issue 20), rounded up; two threads on a loaded machine have taken 6 min in all.
# CUDA (preset 1b): an estimate, not yet measured on a GPU.
EXPECTED_S = {"cpu": {"training": 45, "kernels": 15, "layers": 10, "e2e": 25},
              "cuda": {"training": 60, "kernels": 60, "layers": 60, "e2e": 90}}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _run(argv: list[str]) -> int:
    import time

    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if args.vllm_python and args.no_e2e:
        raise UsageError("--vllm-python adds vLLM to the end-to-end table, which --no-e2e skips; drop one of them")
    if args.vllm_python and not os.access(args.vllm_python, os.X_OK):
        raise UsageError(f"--vllm-python {args.vllm_python!r} is not an executable file; pass the python of a venv "
                         "that has vLLM installed")
    device = check_device(args.device)
    if args.device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: the bench runs on cpu or cuda")
    preset = args.preset or ("1b" if device.startswith("cuda") else "tiny")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    tables = ["training"] + [t for t, off in (("kernels", args.no_kernels), ("layers", args.no_serving),
                                                ("e2e", args.no_e2e)) if not off]
    expected = {t: EXPECTED_S[kind][t] for t in tables}
    print(f"fastadapters bench: preset {preset} on {device}; {len(tables)} tables ({', '.join(tables)}), about "
          f"{_minutes(sum(expected.values()))} at the default size on {'one GPU' if kind == 'cuda' else '2 CPU cores'}"
          f"{' (more on a loaded machine)' if kind == 'cpu' else ''} "
          "(--no-kernels, --no-serving, --no-e2e skip tables). A summary comes first when all are done, then "
          "the tables.", flush=True)
    if kind == "cpu" and not (args.no_serving and args.no_e2e):
        from ..ops import cpu_ext

        if not cpu_ext.is_built():
            print("      (first run on this machine: the serving tables compile the C++ CPU kernel of mixed-adapter "
                  "batches first, about a minute more)", flush=True)
    t_start = time.monotonic()

    def stage(i: int, name: str, what: str):
        print(f"[{i}/{len(tables)}] {what} (about {_minutes(expected[name])}) ...", flush=True)
        return time.monotonic()

    def done(t0: float) -> None:
        print(f"      done in {time.monotonic() - t0:.0f} s ({time.monotonic() - t_start:.0f} s so far)", flush=True)

    from . import training

    t0 = stage(1, "training", "training-step table: each adapter type's forward + backward")
    result = training_step_table(preset, args.device, args.dtype, args.r, args.dropout, args.bottleneck_size,
                                 args.repeats, args.only, log=lambda msg: print(f"    {msg.strip()}", flush=True))
    done(t0)
    result["summary"] = training.summary(result)
    records, rendered = [result], [render(result)]
    i = 1
    if not args.no_kernels:
        from . import kernels

        i += 1
        t0 = stage(i, "kernels", "kernel table: one layer, fused vs PEFT vs the plain linear")
        dev = result["env"]["device_type"]
        table = kernels.kernel_table(dev, args.dtype or ("bfloat16" if dev == "cuda" else "float32"), quick=True,
                                     dropout=args.dropout, repeats=args.repeats,
                                     log=lambda msg: print(f"    {' '.join(msg.split()[:3])}", flush=True))
        done(t0)
        table["summary"] = kernels.summary(table)
        records.append(table)
        rendered.append(kernels.render_kernel_table(table))
    if not args.no_serving:
        try:
            from . import layers
        except ImportError:
            layers = None
        if layers is not None:
            i += 1
            t0 = stage(i, "layers", "multi-adapter layer table: B rows from A adapters in one linear")
            serving = layers.bench_serving_table(args.device, quick=True)
            done(t0)
            serving["summary"] = layers.summary(serving)
            records.append(serving)
            rendered.append(layers.render_serving(serving))
    if not args.no_e2e:
        from . import e2e

        i += 1
        t0 = stage(i, "e2e", "end-to-end serving table: the engine over a request stream")
        rec = e2e_section(args.device or result["env"]["device_type"], args.dtype, args.vllm_python)
        done(t0)
        rec["summary"] = e2e.summary(rec)
        records.append(rec)
        rendered.append(e2e.render_e2e(rec))
    print()
    print(render_summary([rec["summary"] for rec in records]))
    for text in rendered:
        print()
        print(text)
    print(f"\nfastadapters bench: {time.monotonic() - t_start:.0f} s in all")
    if args.json:
        for rec in records:
            append_results(args.json, rec)
        print(f"\nappended {len(records)} record(s) to {args.json}")
    return 0
