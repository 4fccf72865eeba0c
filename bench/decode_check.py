"""The engine's decode paths on CUDA: SDPA and FlashInfer attention, eager and from CUDA graphs.

    python bench/decode_check.py [--dtype float16] [--batch 8] [--prompt-len 64] [--new 16] [--adapters 4]

Both the FlashInfer path (``fastadapters/serving/flashinfer_attention.py``) and the decode steps
replayed from CUDA graphs (``cuda_graphs.py``) were written on a machine without a GPU; this is
their first check on one (``bench/gpu_session.sh`` step 4). A small random llama (head_dim 64, which
FlashInfer's kernels take; 4 layers, 8 query / 2 KV heads, GQA as the models served), ``--batch``
prompts of random ids, greedy, ``--new`` tokens each, ``--adapters N`` LoRA adapters (default 4;
rank 16 on q/v, random weights) routed round robin so the captured graphs hold the multi-adapter
kernels too. Engines: "sdpa" and "sdpa+graphs" always; "flashinfer" and "flashinfer+graphs" when
``flashinfer`` imports. It prints how many requests' tokens each engine shares with eager SDPA and
each graph engine with its eager twin (fp16 rounding may flip a near-tie late in a sequence: the
first differing position is printed), the graphs' capture/replay counts, and the median time of a
decode step (every request decoding one token; synchronised) after one warm-up run each
(FlashInfer may JIT-compile its kernels on first use). Exit status 0 when every graph engine gives
its eager twin's tokens and every engine ran, 1 otherwise, 0 with a "skipped" line without CUDA.
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
        captures_before = engine._graphs.stats["captures"] if engine._graphs is not None else 0
        if not engine.step():
            break
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if engine._graphs is not None and engine._graphs.stats["captures"] > captures_before:
            continue  # a capture step: not a decode step's time
        from_graph = engine.stats["graph_steps"] > replays  # a decode step replayed from a graph
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
    if not torch.cuda.is_available():
        print("decode_check: no CUDA device: skipped")
        return 0
    try:
        import flashinfer
        have_fi = f"flashinfer {getattr(flashinfer, '__version__', '?')}"
    except ImportError as e:
        flashinfer, have_fi = None, f"flashinfer not installed ({e}): its two engines skipped"
    print(f"{have_fi}, torch {torch.__version__}, {torch.cuda.get_device_name()}, {a.dtype}, B={a.batch}, "
          f"prompt {a.prompt_len}, new {a.new}")
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    adapters = _save_adapters(a.adapters, dtype, tempfile.mkdtemp(prefix="fi_check_")) if a.adapters else {}
    print(f"{len(adapters)} LoRA adapters, requests round robin")
    runs = {"sdpa": ("sdpa", False), "sdpa+graphs": ("sdpa", True)}
    if flashinfer is not None:
        runs.update({"flashinfer": ("flashinfer", False), "flashinfer+graphs": ("flashinfer", True)})
    results = {}
    for label, (backend, graphs) in runs.items():
        t0 = time.perf_counter()
        try:
            _run(dtype, backend, prompts[:2], 2, graphs, adapters)  # warm-up (FlashInfer's JIT, cuBLAS, Triton)
            print(f"{label}: warm-up {time.perf_counter() - t0:.1f} s")
            results[label] = _run(dtype, backend, prompts, a.new, graphs, adapters)
        except Exception as e:  # report and go on: the other paths still say something
            print(f"{label}: FAILED {type(e).__name__}: {e}")
    ok = set(results) == set(runs)

    def compare(label, ref_label):
        out, ref = results[label][0], results[ref_label][0]
        equal = sum(x == y for x, y in zip(out, ref))
        print(f"greedy tokens equal {label} vs {ref_label}: {equal}/{len(prompts)} requests")
        for i, (x, y) in enumerate(zip(out, ref)):
            if x != y:
                at = next(j for j, (u, v) in enumerate(zip(x, y)) if u != v)
                print(f"  request {i}: first differs at token {at}: {label} {x[at:at + 4]} {ref_label} {y[at:at + 4]}")
        return equal == len(prompts)

    for label in results:
        if label != "sdpa" and "sdpa" in results:
            compare(label, "sdpa")
    for label in ("sdpa", "flashinfer"):
        if label in results and label + "+graphs" in results:
            ok &= compare(label + "+graphs", label)
    med = {k: statistics.median(v[1]) for k, v in results.items() if v[1]}
    for label, m in med.items():
        print(f"{label}: decode step median {1e3 * m:.3f} ms over {len(results[label][1])} steps")
    for a_, b_ in (("sdpa", "sdpa+graphs"), ("flashinfer", "flashinfer+graphs"), ("sdpa", "flashinfer"),
                   ("sdpa+graphs", "flashinfer+graphs")):
        if a_ in med and b_ in med:
            print(f"decode step {a_} / {b_}: {med[a_] / med[b_]:.2f}x")
    return 0 if ok else 1



if __name__ == "__main__":
    sys.exit(main())
