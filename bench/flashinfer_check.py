"""The engine's FlashInfer attention path (eager and from CUDA graphs) vs its SDPA path on CUDA.

    python bench/flashinfer_check.py [--dtype float16] [--batch 8] [--prompt-len 64] [--new 16] [--adapters 4]

The FlashInfer path (``fastadapters/serving/flashinfer_attention.py``) was written on a machine
without a GPU; this is its first check on one (``bench/gpu_session.sh`` runs it when ``flashinfer``
imports on the device). A small random llama (head_dim 64, which FlashInfer's kernels take; 4
layers, 8 query / 2 KV heads, GQA as the models served), ``--batch`` prompts of random ids, greedy,
``--new`` tokens each, run by ``Engine(attention_backend="flashinfer")`` and by
``Engine(attention_backend="sdpa")`` on the same model. It prints how many requests' tokens are
equal (fp16 rounding may flip a near-tie late in a sequence: the first differing position is
printed), and the median time of a decode step (every request decoding one token; synchronised)
for both, after one warm-up run each (FlashInfer may JIT-compile its kernels on first use).
Three engines run: FlashInfer with decode steps replayed from CUDA graphs (``cuda_graphs=True``,
``cuda_graphs.py``, also never run on a GPU before), FlashInfer eager, SDPA eager; the graph engine's
tokens are compared with both, and its decode steps are timed beside theirs. ``--adapters N`` (default
4) patches N LoRA adapters (rank 16 on q/v, random weights) and routes the requests over them round
robin, so the captured graph holds the multi-adapter kernels too (0: the bare model).
Exit status 0 when all tokens are equal, 1 when some differ, 0 with "flashinfer not installed:
skipped" when it does not import (or there is no GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
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


def _save_adapters(n, dtype, root):
    """``n`` LoRA adapters (rank 16, q/v, random weights) of ``_model``'s shape saved under ``root``:
    name -> directory."""
    import fastadapters as fa

    model = _model(dtype)
    g = torch.Generator().manual_seed(2)
    paths = {}
    for i in range(n):
        name = f"lora{i}"
        fa.patch(model, "lora", name=name, r=16, alpha=32, target_modules=["q_proj", "v_proj"])
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        paths[name] = fa.save_adapter(model, os.path.join(root, name), name=name)
    return paths


def _run(dtype, backend, prompts, new, graphs=False, adapters=None):
    from fastadapters.serving.engine import Engine
    from fastadapters.serving.sampling import SamplingParams

    length = len(prompts[0]) + new
    engine = Engine(_model(dtype), attention_backend=backend, max_num_seqs=len(prompts), block_size=16,
                    max_model_len=length, num_blocks=len(prompts) * -(-length // 16) + 8, cuda_graphs=graphs)
    assert engine.attention_backend == backend, engine.attention_backend
    for name, path in (adapters or {}).items():
        engine.load_adapter(name, path, confined=False)
    names = list(adapters or {})
    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    reqs = [engine.submit(p, sp, adapter=names[i % len(names)] if names else None) for i, p in enumerate(prompts)]
    decode = []
    while True:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replays = engine.stats["graph_steps"]
        if not engine.step():
            break
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        from_graph = engine.stats["graph_steps"] > replays  # a decode step replayed (or captured)
        if from_graph or (engine.last_tables is not None and all(s.n == 1 for s in engine.last_tables.segments)):
            decode.append(dt)
    if graphs:
        print(f"  graphs: {dict(engine._graphs.stats)}")
    return [r.output_ids for r in reqs], decode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
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
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    adapters = _save_adapters(a.adapters, dtype, tempfile.mkdtemp(prefix="fi_check_")) if a.adapters else {}
    print(f"{len(adapters)} LoRA adapters, requests round robin")
    runs = {"flashinfer+graphs": ("flashinfer", True), "flashinfer": ("flashinfer", False), "sdpa": ("sdpa", False)}
    results = {}
    for label, (backend, graphs) in runs.items():
        t0 = time.perf_counter()
        try:
            _run(dtype, backend, prompts[:2], 2, graphs, adapters)  # warm-up (FlashInfer's JIT, cuBLAS, Triton)
            print(f"{label}: warm-up {time.perf_counter() - t0:.1f} s")
            results[label] = _run(dtype, backend, prompts, a.new, graphs, adapters)
        except Exception as e:  # report and go on: the other paths still say something
            print(f"{label}: FAILED {type(e).__name__}: {e}")
    equal_all = True
    ref = results.get("sdpa")
    for label in ("flashinfer+graphs", "flashinfer"):
        if label not in results or ref is None:
            equal_all = False
            continue
        out = results[label][0]
        equal = sum(x == y for x, y in zip(out, ref[0]))
        equal_all &= equal == len(prompts)
        print(f"greedy tokens equal {label} vs sdpa: {equal}/{len(prompts)} requests")
        for i, (x, y) in enumerate(zip(out, ref[0])):
            if x != y:
                at = next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)
                print(f"  request {i}: first differs at token {at}: {label} {x[at:at + 4]} sdpa {y[at:at + 4]}")
    if "flashinfer+graphs" in results and "flashinfer" in results:
        same = sum(x == y for x, y in zip(results["flashinfer+graphs"][0], results["flashinfer"][0]))
        print(f"greedy tokens equal flashinfer+graphs vs flashinfer eager: {same}/{len(prompts)} requests")
        equal_all &= same == len(prompts)
    for label, (_, dec) in results.items():
        if dec:
            print(f"{label}: decode step median {1e3 * statistics.median(dec):.3f} ms over {len(dec)} steps")
    med = {k: statistics.median(v[1]) for k, v in results.items() if v[1]}
    for a_, b_ in (("sdpa", "flashinfer"), ("flashinfer", "flashinfer+graphs")):
        if a_ in med and b_ in med:
            print(f"decode step {a_} / {b_}: {med[a_] / med[b_]:.2f}x")
    return 0 if equal_all else 1


if __name__ == "__main__":
    sys.exit(main())
