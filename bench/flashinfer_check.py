"""The engine's FlashInfer attention path vs its SDPA path on CUDA: greedy tokens and decode step time.

    python bench/flashinfer_check.py [--dtype float16] [--batch 8] [--prompt-len 64] [--new 16]

The FlashInfer path (``fastadapters/serving/flashinfer_attention.py``) was written on a machine
without a GPU; this is its first check on one (``bench/gpu_session.sh`` runs it when ``flashinfer``
imports on the device). A small random llama (head_dim 64, which FlashInfer's kernels take; 4
layers, 8 query / 2 KV heads, GQA as the models served), ``--batch`` prompts of random ids, greedy,
``--new`` tokens each, run by ``Engine(attention_backend="flashinfer")`` and by
``Engine(attention_backend="sdpa")`` on the same model. It prints how many requests' tokens are
equal (fp16 rounding may flip a near-tie late in a sequence: the first differing position is
printed), and the median time of a decode step (every request decoding one token; synchronised)
for both, after one warm-up run each (FlashInfer may JIT-compile its kernels on first use).
Exit status 0 when all tokens are equal, 1 when some differ, 0 with "flashinfer not installed:
skipped" when it does not import (or there is no GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _model(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def _run(model, backend, prompts, new):
    from fastadapters.serving.engine import Engine
    from fastadapters.serving.sampling import SamplingParams

    length = len(prompts[0]) + new
    engine = Engine(model, backend="torch", attention_backend=backend, max_num_seqs=len(prompts), block_size=16,
                    max_model_len=length, num_blocks=len(prompts) * -(-length // 16) + 8)
    assert engine.attention_backend == backend, engine.attention_backend
    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    reqs = [engine.submit(p, sp) for p in prompts]
    decode = []
    while True:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if not engine.step():
            break
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if all(s.n == 1 for s in engine.last_tables.segments):
            decode.append(dt)
    return [r.output_ids for r in reqs], decode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    a = ap.parse_args(argv)
    try:
        import flashinfer
    except ImportError as e:
        print(f"flashinfer not installed: skipped ({e})")
        return 0
    if not torch.cuda.is_available():
        print("flashinfer_check: no CUDA device: skipped")
        return 0
    print(f"flashinfer {getattr(flashinfer, '__version__', '?')}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}, {a.dtype}, B={a.batch}, prompt {a.prompt_len}, new {a.new}")
    model = _model(getattr(torch, a.dtype))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    results = {}
    for backend in ("flashinfer", "sdpa"):
        t0 = time.perf_counter()
        _run(model, backend, prompts[:2], 2)  # warm-up (FlashInfer's JIT, cuBLAS handles)
        print(f"{backend}: warm-up {time.perf_counter() - t0:.1f} s")
        results[backend] = _run(model, backend, prompts, a.new)
    (fi_out, fi_dec), (sd_out, sd_dec) = results["flashinfer"], results["sdpa"]
    equal = sum(x == y for x, y in zip(fi_out, sd_out))
    print(f"greedy tokens equal flashinfer vs sdpa: {equal}/{len(prompts)} requests")
    for i, (x, y) in enumerate(zip(fi_out, sd_out)):
        if x != y:
            at = next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)
            print(f"  request {i}: first differs at token {at}: flashinfer {x[at:at + 4]} sdpa {y[at:at + 4]}")
    for name, dec in (("flashinfer", fi_dec), ("sdpa", sd_dec)):
        if dec:
            print(f"{name}: decode step median {1e3 * statistics.median(dec):.3f} ms over {len(dec)} steps")
    if fi_dec and sd_dec:
        print(f"decode step sdpa / flashinfer: {statistics.median(sd_dec) / statistics.median(fi_dec):.2f}x")
    return 0 if equal == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
