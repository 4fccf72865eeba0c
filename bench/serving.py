"""Multi-adapter serving benchmark (issue 4): decode and prefill, B rows x A distinct adapters.

    python bench/serving.py                 # CUDA if available (Llama-7B q_proj, bf16, Triton), else CPU
    python bench/serving.py --device cpu --full
    python bench/serving.py --json bench/results/serving.json

Times fastadapters' routed ``multi_adapter`` layer against PEFT's ``adapter_names=`` loop, the
adapters run one after another, and one merged adapter, each as time over the memory floor; the
table itself lives in ``fastadapters.bench.layers`` (what ``fastadapters bench`` also prints).
"""
from __future__ import annotations

import argparse
import os
import sys

from fastadapters.bench.harness import append_results
from fastadapters.bench.layers import bench_serving_table, render_serving


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--full", action="store_true", help="CPU: larger shapes and more repeats than the quick table")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"),
                    help="append the record here ('' to skip)")
    args = ap.parse_args(argv)
    result = bench_serving_table(args.device, quick=not args.full, with_peft=not args.no_peft, partial_on_interrupt=True)
    print(render_serving(result))
    if args.json:
        append_results(args.json, result)
        print(f"\nappended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
