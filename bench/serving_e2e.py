"""End-to-end serving benchmark (issue 13): the engine over Zipf-distributed requests for A adapters.

    python bench/serving_e2e.py                               # "small" random llama, A = 1, 8, 32
    python bench/serving_e2e.py --model ~/.cache/fastadapters-tests/smollm2-...  --requests 32
    python bench/serving_e2e.py --json ''                     # print only
    python bench/serving_e2e.py --model DIR --threads 1 --vllm-python /path/to/vllm-venv/bin/python
    python bench/serving_e2e.py --model DIR --prompt-lens 128,512 --no-peft --no-hf   # long prompts

Output tokens/s, TTFT and TPOT (p50/p99) against the same engine with base-model requests only and
PEFT's padded ``generate`` with ``adapter_names``, and HF's batched ``generate`` of the base model; the measurement lives in
``fastadapters.bench.e2e``. Results are appended to bench/results/serving_e2e.json.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastadapters.bench.harness import append_results
from fastadapters.bench.e2e import render_e2e, run_e2e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="a model folder, or 'small' (a random llama from a config)")
    ap.add_argument("--adapters", default="1,8,32", help="comma-separated adapter counts A")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--prompt-lens", default="8,64", help="LOW,HIGH: each prompt's length is drawn uniformly from it")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--backend", default=None, choices=(None, "torch", "triton", "cuda"))
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip HF's batched generate of the base model")
    ap.add_argument("--trials", type=int, default=1,
                    help="measure every A this many times, engine / base-only / PEFT interleaved; report medians")
    ap.add_argument("--parity", type=int, default=8, help="greedy requests checked against generate alone")
    ap.add_argument("--vllm-python", default=None,
                    help="also run vLLM's offline engine (LoRA adapters of the same ranks) in this Python, one "
                         "trial per A; with --threads N it is bound to cores 0..N-1")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "serving_e2e.json"))
    args = ap.parse_args(argv)
    try:
        prompt_lens = tuple(int(v) for v in args.prompt_lens.split(","))
    except ValueError:
        prompt_lens = ()
    if len(prompt_lens) != 2:
        ap.error(f"--prompt-lens: got {args.prompt_lens!r}; valid: LOW,HIGH (two integers, e.g. 128,512)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_e2e(args.model, tuple(int(a) for a in args.adapters.split(",")), args.requests, args.max_tokens,
                     prompt_lens=prompt_lens, max_num_seqs=args.max_num_seqs, device=args.device, dtype=args.dtype, with_peft=not args.no_peft,
                     with_hf=not args.no_hf,
                     parity=args.parity, backend=args.backend, trials=args.trials, vllm_python=args.vllm_python,
                     vllm_cpu_bind=(f"0-{args.threads - 1}" if args.threads and args.threads > 1 else
                                    "0" if args.threads else None))
    print(render_e2e(result))
    if args.json:
        append_results(args.json, result)
        print(f"\nappended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
