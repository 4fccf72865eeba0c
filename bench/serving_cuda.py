"""Decode timing of the CUDA multi-adapter op (csrc/multi_adapter.cu) against its memory floor.

One decode step of one Llama-7B-shaped projection (K = N = 4096, bf16): B rows routed over A
distinct adapters (round-robin, so min(A, B) adapters are used), rank 16 or a mix of ranks
(1, 4, 8, 16, 64) in one store padded to R = 64. Rows:

    cuda        fastadapters::cuda_multi_adapter, metadata precomputed (shared by all layers)
    cuda+meta   the same plus multi_adapter_meta (what a single layer would pay)
    torch       multi_adapter_ref (gathered batched matmul), the plain-torch path

The figure of merit is time / floor, where floor = bytes that must move (each used adapter's
down and up rows up to its rank read once, x and y0 read, y written) over the bandwidth measured
in the same run (a device-to-device copy). The op excludes the base GEMM, so this is the adapter
branch's own floor; bench/serving.py owns the whole-layer number. Results are appended to
bench/results/serving_cuda.json with the device named (``fastadapters.bench.harness``).

    python bench/serving_cuda.py [--quick] [--out bench/results/serving_cuda.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastadapters.bench.harness import append_results, environment, time_fn
from fastadapters.ops import cuda_ops as co

RANK_MIX = (1, 4, 8, 16, 64)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * src.numel() / t


def decode_case(B: int, A: int, ranks: str, device: torch.device, K: int = 4096, N: int = 4096,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """Times one decode step of B rows over A adapters; returns the record (seconds, bytes)."""
    gen = torch.Generator().manual_seed(seed)
    S = max(A, 1)
    R = 64 if ranks == "mix" else 16
    sizes = [RANK_MIX[s % len(RANK_MIX)] if ranks == "mix" else 16 for s in range(S)]
    down = (torch.randn(S, R, K, generator=gen) / K ** 0.5).to(dtype).to(device)
    up = (torch.randn(S, N, R, generator=gen) / R ** 0.5).to(dtype).to(device)
    sizes_t = torch.tensor(sizes, dtype=torch.int32, device=device)
    scales = torch.full((S,), 2.0, device=device)
    acts = torch.zeros(S, dtype=torch.int32, device=device)
    x = torch.randn(B, K, generator=gen).to(dtype).to(device)
    y0 = torch.randn(B, N, generator=gen).to(dtype).to(device)
    row_slot = (torch.arange(B) % A).to(torch.int32).to(device)
    meta = co.multi_adapter_meta(row_slot, S)
    used = sorted(set((torch.arange(B) % A).tolist()))
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = sum(sizes[s] * (K + N) for s in used) * elem + B * (K + 2 * N) * elem
    args = (y0, x, row_slot, down, up, sizes_t, scales, acts)
    return {
        "B": B, "A": A, "ranks": ranks, "K": K, "N": N, "dtype": str(dtype).replace("torch.", ""),
        "bytes": nbytes,
        "cuda_s": time_fn(lambda: co.multi_adapter_cuda(*args, meta=meta), device),
        "cuda_meta_s": time_fn(lambda: co.multi_adapter_cuda(*args), device),
        "torch_s": time_fn(lambda: co.multi_adapter_ref(*args), device),
    }


def decode_table(device: torch.device, quick: bool = False) -> dict:
    bw = measure_bandwidth(device)
    grid_b = (1, 8) if quick else (1, 8, 32, 64)
    grid_a = (1, 8) if quick else (1, 8, 32, 64)
    rows = []
    out = {"benchmark": "serving_cuda.decode", "bandwidth_Bps": bw, "env": environment(device), "rows": rows}
    try:
        for ranks in ("16", "mix"):
            for B in grid_b:
                for A in grid_a:
                    rec = decode_case(B, A, ranks, device)
                    rec["floor_s"] = rec["bytes"] / bw
                    for k in ("cuda", "cuda_meta", "torch"):
                        rec[f"{k}_over_floor"] = rec[f"{k}_s"] / rec["floor_s"]
                    rows.append(rec)
    except KeyboardInterrupt:  # a time limit (SIGINT): keep the rows measured so far, marked
        out["truncated"] = True
    return out


def render(result: dict) -> str:
    lines = [f"device: {result['env']['device']}, copy bandwidth {result['bandwidth_Bps'] / 1e9:.0f} GB/s",
             "| ranks | B | A | floor us | cuda us (x floor) | cuda+meta us | torch us |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['ranks']} | {r['B']} | {r['A']} | {r['floor_s'] * 1e6:.1f} | "
                     f"{r['cuda_s'] * 1e6:.1f} ({r['cuda_over_floor']:.2f}x) | "
                     f"{r['cuda_meta_s'] * 1e6:.1f} | {r['torch_s'] * 1e6:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B, A in {1, 8} only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving_cuda.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("serving_cuda: needs a CUDA GPU (the op under test is the CUDA kernel)", file=sys.stderr)
        return 2
    result = decode_table(torch.device("cuda"), quick=args.quick)
    print(render(result))
    append_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
